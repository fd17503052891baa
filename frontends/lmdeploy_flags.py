"""LMDeploy's command lines, accepted as they are.

``lmdeploy serve api_server MODEL ...`` (0.16), ``lmdeploy chat MODEL ...`` (0.16) and
``lmdeploy serve gradio ...`` (0.9.2, its last release) become ``lmserve`` command lines by
changing the program's name. Every flag those commands have is in :data:`LMDEPLOY_FLAGS`,
with what lmserve does with it:

- ``same``: lmserve has the flag, with LMDeploy's meaning (its own parser registers it);
- ``alias``: another spelling of one of lmserve's flags (registered there as a second
  option string);
- ``notice``: it means nothing here; given, one line on stderr at start-up says why and
  the server starts;
- ``refused``: lmserve cannot do what it asks; given, the command exits with status 2 and
  one line that says why and names the way to get it, before any weight loads.

A flag given with one of its ``inert`` values (LMDeploy's default, or what lmserve does
anyway: ``--backend pytorch``, ``--quant-policy 0``) passes silently. The parsers take
each flag's values as LMDeploy does (``nargs``, types, choices), so a copied line parses;
the CLI also reads ``--session_len`` as ``--session-len``, as LMDeploy's parser does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

SAME, ALIAS, NOTICE, REFUSED = "same", "alias", "notice", "refused"
#: The commands that take LMDeploy's flags (``lmserve serve api_client``'s two are its own).
API_SERVER, CHAT, GRADIO = "serve api_server", "chat", "serve gradio"

#: ``--quant-policy``'s names (LMDeploy 0.16's QuantPolicy) and numbers.
QUANT_POLICIES = {"none": 0, "int4": 4, "int8": 8, "fp8": 16, "fp8_e4m3": 16, "fp8_e5m2": 17, "turbo_quant": 42}
#: ``--log-level`` names LMDeploy takes (Python's logging names) that lmserve spells otherwise.
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "NOTSET": "DEBUG"}


def quant_policy(value: str) -> int:
    """``--quant-policy``: a name or a number, as LMDeploy parses it."""
    if value.lower() in QUANT_POLICIES:
        return QUANT_POLICIES[value.lower()]
    number = int(value)
    if number not in QUANT_POLICIES.values():
        raise ValueError(value)
    return number


def json_value(value: str) -> Any:
    """``--hf-overrides``: a JSON value."""
    return json.loads(value)


quant_policy.__name__ = "quant policy (none|int4|int8|fp8|fp8_e5m2|turbo_quant or 0|4|8|16|17|42)"
json_value.__name__ = "JSON"


@dataclass(frozen=True)
class LMDeployFlag:
    """One flag of LMDeploy's command lines and what lmserve does with it."""

    flag: str
    kind: str
    #: What lmserve does: the notice or refusal printed after ``FLAG VALUE:``, the help
    #: line, and the row of docs/cli.md.
    does: str
    #: LMDeploy's way of taking a value: argparse's ``nargs``, ``type`` and ``choices``;
    #: ``switch``: a flag without a value (``store_true``).
    nargs: str | None = None
    type: Callable[[str], Any] = str
    choices: tuple | None = None
    switch: bool = False
    #: Values that change nothing here: given, they pass without a notice or a refusal.
    inert: tuple = ()
    #: ``alias``: lmserve's flag that this one spells.
    ours: str | None = None

    @property
    def dest(self) -> str:
        """Where the parsed value goes: a name of its own, so it never meets an lmserve option."""
        return "lmdeploy_" + self.flag[2:].replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        if self.switch:
            return {"action": "store_true"}
        metavar = None if self.choices else self.flag[2:].upper().replace("-", "_")
        kwargs: dict[str, Any] = {"type": self.type, "nargs": self.nargs, "choices": self.choices, "metavar": metavar}
        return {key: value for key, value in kwargs.items() if value is not None}


def _same(flag: str, does: str = "as LMDeploy's.", **syntax: Any) -> LMDeployFlag:
    """A flag lmserve has; ``syntax``: how LMDeploy takes its value (for a page that only names it)."""
    return LMDeployFlag(flag, SAME, does, **syntax)


_NO_DLLM = "no diffusion LLMs here."
_ENGINE_PICKS = "the torch engine sizes this itself."

#: Every flag of LMDeploy 0.16's ``serve api_server`` (a superset of its ``chat``'s and of
#: 0.9.2's ``serve gradio``'s), in its parser's order.
LMDEPLOY_FLAGS: tuple[LMDeployFlag, ...] = (
    _same("--server-name"),
    _same("--server-port", type=int),
    _same("--allow-origins", "as LMDeploy's, but without it no CORS headers are sent (LMDeploy's default is *).",
          nargs="+"),
    _same("--allow-credentials", switch=True),
    _same("--allow-methods", nargs="+"),
    _same("--allow-headers", nargs="+"),
    LMDeployFlag("--proxy-url", REFUSED, "lmserve does not register with LMDeploy's proxy; put any HTTP load "
                 "balancer in front of the servers."),
    _same("--max-concurrent-requests", "as LMDeploy's: more requests wait (up to --max-queued-requests, then 503).",
          type=int),
    LMDeployFlag("--allowed-media-domains", NOTICE, "lmserve serves text models: no media URLs are fetched.",
                 nargs="+"),
    LMDeployFlag("--backend", NOTICE, "lmserve runs its own torch engine (as LMDeploy's pytorch backend); "
                 "there is no TurboMind.", choices=("pytorch", "turbomind"), inert=("pytorch",)),
    _same("--log-level", "as LMDeploy's; WARN, FATAL and NOTSET read as WARNING, CRITICAL and DEBUG.",
          choices=("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")),
    _same("--api-keys", "as LMDeploy's (given without keys: no authentication).", nargs="*"),
    LMDeployFlag("--ssl", REFUSED, "TLS is not supported yet; put a TLS-terminating reverse proxy in front.",
                 switch=True),
    _same("--model-name"),
    _same("--max-log-len", "as LMDeploy's: the request log prints at most N characters of a prompt and N of "
          "its token ids (prompts are logged at DEBUG here, at INFO in LMDeploy).", type=int),
    LMDeployFlag("--disable-fastapi-docs", ALIAS, "--disable-docs.", switch=True, ours="--disable-docs"),
    LMDeployFlag("--allow-terminate-by-client", NOTICE, "there is no /terminate route; stop the server with "
                 "SIGTERM or Ctrl+C.", switch=True),
    LMDeployFlag("--enable-abort-handling", NOTICE, "there is no /abort_request route; a request stops when its "
                 "client disconnects, an interactive one with cancel.", switch=True),
    LMDeployFlag("--trust-remote-code", NOTICE, "no code of the model's repository runs here: lmserve's own "
                 "architectures load the weights.", switch=True),
    _same("--chat-template", "as LMDeploy's: a template name, or a JSON file or string of its fields."),
    _same("--tool-call-parser"),
    _same("--reasoning-parser"),
    LMDeployFlag("--revision", REFUSED, "choosing a revision is not supported yet (nothing is downloaded); give "
                 "the snapshot's directory as MODEL.", inert=("main",)),
    LMDeployFlag("--download-dir", NOTICE, "nothing is downloaded; MODEL is looked up in the hub cache "
                 "(set HF_HUB_CACHE=DIR to look in DIR)."),
    _same("--generation-config", "as LMDeploy's (auto, lmdeploy, a directory), plus vllm and none."),
    LMDeployFlag("--adapters", REFUSED, "LoRA adapters are not supported yet.", nargs="*", inert=([],)),
    _same("--device", "cuda as LMDeploy's; ascend, maca and camb are refused (lmserve runs on CPUs and CUDA).",
          choices=("cuda", "ascend", "maca", "camb")),
    LMDeployFlag("--eager-mode", ALIAS, "--enforce-eager.", switch=True, ours="--enforce-eager"),
    LMDeployFlag("--logprobs-mode", NOTICE, "logprobs need no flag here; they are always the model's own, "
                 "before temperature and penalties (raw_logprobs), never raw logits.",
                 choices=("raw_logits", "raw_logprobs"), inert=("raw_logprobs",)),
    LMDeployFlag("--dllm-block-length", NOTICE, _NO_DLLM, type=int),
    LMDeployFlag("--dllm-unmasking-strategy", NOTICE, _NO_DLLM, inert=("low_confidence_dynamic",),
                 choices=("low_confidence_dynamic", "low_confidence_static", "sequential")),
    LMDeployFlag("--dllm-denoising-steps", NOTICE, _NO_DLLM, type=int),
    LMDeployFlag("--dllm-confidence-threshold", NOTICE, _NO_DLLM, type=float, inert=(0.85,)),
    LMDeployFlag("--enable-return-routed-experts", NOTICE, "routed expert ids are not returned.", switch=True),
    LMDeployFlag("--distributed-executor-backend", NOTICE, "the --tp ranks are processes of their nodes; "
                 "`lmserve serve ray` runs engines as Ray Serve replicas.", choices=("uni", "mp", "ray"),
                 inert=("mp",)),
    LMDeployFlag("--kernel-block-size", NOTICE, "one block size, --cache-block-seq-len.", type=int, inert=(-1,)),
    LMDeployFlag("--prefix-cache-state-budget", NOTICE, "no SSM models here.", type=int, inert=(0,)),
    LMDeployFlag("--prefix-cache-decode-state-interval", NOTICE, "no SSM models here.", type=int, inert=(0,)),
    LMDeployFlag("--language-model-only", NOTICE, "lmserve serves text models: there is no vision encoder "
                 "to skip.", switch=True),
    _same("--dtype", "as LMDeploy's; lmserve also takes float32.", choices=("auto", "float16", "bfloat16")),
    _same("--tp", type=int),
    _same("--session-len", type=int),
    _same("--max-batch-size", type=int),
    _same("--cache-max-entry-count", "as LMDeploy's (on the CPU: a fraction of the available RAM).", type=float),
    _same("--cache-block-seq-len", type=int),
    _same("--enable-prefix-caching", switch=True),
    _same("--max-prefill-token-num", type=int),
    LMDeployFlag("--quant-policy", REFUSED, "KV-cache quantization is not supported yet (the KV cache keeps "
                 "--dtype).", type=quant_policy, inert=(0,)),
    LMDeployFlag("--model-format", REFUSED, "quantized checkpoints are not supported yet; serve the float "
                 "checkpoint with --quantization int4 or int8 (CPU), or a quantized GGUF file.",
                 choices=("hf", "awq", "gptq", "compressed-tensors", "fp8", "mxfp4"), inert=("hf",)),
    LMDeployFlag("--hf-overrides", REFUSED, "overriding the model's config is not supported yet; edit a copy "
                 "of its config.json.", type=json_value, inert=({},)),
    LMDeployFlag("--disable-metrics", NOTICE, "/metrics is always served (it costs nothing unread).",
                 switch=True),
    LMDeployFlag("--dp", REFUSED, "data parallelism is not supported; run `lmserve serve ray` (engine "
                 "replicas) or several servers behind a load balancer.", type=int, inert=(1,)),
    LMDeployFlag("--ep", NOTICE, "no expert parallelism: --tp splits the experts with the rest of the model.",
                 type=int, inert=(1,)),
    LMDeployFlag("--enable-microbatch", NOTICE, "no microbatches here.", switch=True),
    LMDeployFlag("--enable-eplb", NOTICE, "no expert load balancing here.", switch=True),
    LMDeployFlag("--role", REFUSED, "prefill/decode disaggregation is not supported; serve Hybrid.",
                 choices=("Hybrid", "Prefill", "Decode"), inert=("Hybrid",)),
    LMDeployFlag("--migration-backend", NOTICE, "no KV migration (no disaggregation) here.",
                 choices=("DLSlime", "Mooncake"), inert=("DLSlime",)),
    LMDeployFlag("--cudagraph-capture-batch-sizes", NOTICE, "the engine captures its own batch buckets "
                 "(docs: --enforce-eager).", nargs="+", type=int),
    _same("--node-rank", type=int),
    _same("--nnodes", type=int),
    LMDeployFlag("--cp", NOTICE, "no context parallelism: --tp splits the attention heads.", type=int, inert=(1,)),
    LMDeployFlag("--rope-scaling-factor", REFUSED, "dynamic NTK scaling is not supported yet.", type=float,
                 inert=(0.0,)),
    LMDeployFlag("--num-tokens-per-iter", NOTICE, "prompts are chunked by --max-prefill-token-num.", type=int,
                 inert=(0,)),
    LMDeployFlag("--max-prefill-iters", NOTICE, "prompts are chunked by --max-prefill-token-num.", type=int,
                 inert=(1,)),
    LMDeployFlag("--async", NOTICE, _ENGINE_PICKS, type=int, choices=(0, 1), inert=(1,)),
    LMDeployFlag("--communicator", NOTICE, "the engine picks how the --tp ranks talk (NCCL on CUDA, shared "
                 "memory and gloo on the CPU).", choices=("nccl", "native", "cuda-ipc"), inert=("nccl",)),
    LMDeployFlag("--dist-init-addr", NOTICE, "the ranks meet at --master-addr HOST --master-port PORT: give "
                 "those instead."),
    LMDeployFlag("--vision-max-batch-size", NOTICE, "no vision models here.", type=int, inert=(1,)),
    LMDeployFlag("--speculative-algorithm", REFUSED, "speculative decoding is not supported yet.",
                 choices=("eagle", "eagle3", "deepseek_mtp", "hy3_mtp", "qwen3_5_mtp")),
    LMDeployFlag("--speculative-draft-model", NOTICE, "speculative decoding is not supported yet; ignored "
                 "(as LMDeploy does without --speculative-algorithm)."),
    LMDeployFlag("--speculative-num-draft-tokens", NOTICE, "speculative decoding is not supported yet.",
                 type=int, inert=(1,)),
)

BY_FLAG = {entry.flag: entry for entry in LMDEPLOY_FLAGS}

#: The flags of LMDeploy 0.16's ``chat``.
CHAT_FLAGS = frozenset((
    "--backend", "--chat-template", "--revision", "--download-dir", "--trust-remote-code", "--adapters",
    "--device", "--eager-mode", "--dllm-block-length", "--prefix-cache-state-budget",
    "--prefix-cache-decode-state-interval", "--dtype", "--tp", "--session-len", "--cache-max-entry-count",
    "--enable-prefix-caching", "--quant-policy", "--language-model-only", "--model-format",
    "--rope-scaling-factor", "--communicator", "--cp", "--async", "--speculative-algorithm",
    "--speculative-draft-model", "--speculative-num-draft-tokens",
))
#: The flags of LMDeploy 0.9.2's ``serve gradio`` but its own ``--share``; lmserve's page
#: talks to a running server, so all but the two it binds with are notices there.
GRADIO_FLAGS = frozenset((
    "--server-name", "--server-port", "--backend", "--max-log-len", "--revision", "--download-dir",
    "--chat-template", "--device", "--eager-mode", "--dtype", "--tp", "--session-len", "--max-batch-size",
    "--cache-max-entry-count", "--cache-block-seq-len", "--enable-prefix-caching", "--max-prefill-token-num",
    "--model-format", "--quant-policy", "--rope-scaling-factor", "--communicator",
))
GRADIO_SHARE = LMDeployFlag("--share", NOTICE, "there is no public gradio link; the page is served on "
                            "--server-name:--server-port.", switch=True)
_GRADIO_SERVER_FLAG = "the page talks to a running server: model and engine flags belong to that server's " \
    "`lmserve serve api_server` command line."


def flags_of(command: str) -> tuple[LMDeployFlag, ...]:
    """The LMDeploy flags ``command`` takes as they behave there."""
    if command == API_SERVER:
        return LMDEPLOY_FLAGS
    if command == CHAT:
        return tuple(entry for entry in LMDEPLOY_FLAGS if entry.flag in CHAT_FLAGS)
    if command == GRADIO:
        served = [entry for entry in LMDEPLOY_FLAGS if entry.flag in GRADIO_FLAGS - {"--server-name", "--server-port"}]
        return (GRADIO_SHARE, *(dataclasses.replace(entry, kind=NOTICE, does=_GRADIO_SERVER_FLAG, ours=None)
                                for entry in served))
    return ()


def add_lmdeploy_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Register ``command``'s LMDeploy flags that ``parser`` does not have yet (after its own
    and its plugins' flags, so a flag lmserve gains later is its own), in a help group."""
    group = parser.add_argument_group(
        "LMDeploy compatibility", "LMDeploy's flags that mean nothing here (given, a line says why) or ask for "
        "what lmserve cannot do yet (given, the command exits 2 and says why). See docs/cli.md.")
    for entry in flags_of(command):
        if entry.kind in (NOTICE, REFUSED) and entry.flag not in parser._option_string_actions:
            group.add_argument(entry.flag, dest=entry.dest, default=argparse.SUPPRESS,
                               help=f"({entry.kind}) {entry.does}", **entry.argparse_kwargs())


def lmdeploy_notices(args: argparse.Namespace, command: str) -> list[str]:
    """The start-up lines of the LMDeploy flags on this command line (``FLAG VALUE: why``);
    a refused one raises :class:`ValueError` with its line."""
    notices = []
    for entry in flags_of(command):
        if not hasattr(args, entry.dest):  # not given (or registered by lmserve itself)
            continue
        value = getattr(args, entry.dest)
        if value in entry.inert:
            continue
        line = f"{entry.flag}{_shown(value)}: {entry.does}"
        if entry.kind == REFUSED:
            raise ValueError(line)
        notices.append(line)
    return notices


def _shown(value: Any) -> str:
    if value is True:
        return ""
    if isinstance(value, list):
        return "".join(f" {item}" for item in value)
    if isinstance(value, dict):
        return " " + json.dumps(value)
    return f" {value}"


def log_level(value: str) -> str:
    """``--log-level``: upper-cased, Python's other names read as lmserve's."""
    value = value.upper()
    return LOG_LEVEL_ALIASES.get(value, value)
