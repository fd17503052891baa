"""The checks every model family passes against HF transformers (docs/models.md, "What was checked").

A family's test module writes a tiny random checkpoint of its architecture with
:func:`write_family_model` (transformers' own config class and ``save_pretrained``,
seeded weights large enough that logits are far from uniform), converts it to GGUF
with llama.cpp's own converter (:func:`convert_to_gguf`), then asserts, on
:data:`PROMPTS` (one longer than a tiny sliding window), for the HF directory and
the GGUF file alike:

- :func:`check_stepwise_logits`: our model, one sequence through its KV cache (prefill,
  then one decode at a time), gives HF ``generate``'s greedy tokens, and float32 logits
  within :data:`RELATIVE_TOLERANCE` of HF's at every prompt position and every decode step;
- :func:`engine_greedy`: the paged engine's tokens, each prompt alone and all of them in
  one continuous batch (with :data:`OTHER_REQUESTS` beside them);
- :func:`server_greedy_texts`: the same through the HTTP server, one at a time and concurrently;
- :func:`bf16_top1_agreement`: our model in bfloat16 against HF's float32, teacher-forced.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import copy
import json
import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

NEW_TOKENS = 32
#: ``max|ours - hf| <= RELATIVE_TOLERANCE * max|hf|`` per row of logits (float32).
RELATIVE_TOLERANCE = 1e-4
#: Prompts use token ids below this: ordinary tokens of every tokenizer here.
PROMPT_TOKENS = 300
REPO_ROOT = Path(__file__).resolve().parent.parent
#: llama.cpp's converter and its gguf-py, as ``make install-dev`` unpacks them.
LLAMA_CPP = Path(os.environ.get("LMSERVE_LLAMA_CPP", REPO_ROOT / ".venv" / "llama.cpp"))


def _prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, PROMPT_TOKENS, (length,), generator=generator).tolist()


#: Prompts of 3, 11 and 45 tokens (the last longer than the tests' sliding windows).
PROMPTS = [_prompt(1, 3), _prompt(2, 11), _prompt(3, 45)]
#: Other requests that share the engine's steps with :data:`PROMPTS` in the batched run.
OTHER_REQUESTS = [_prompt(4, 7), _prompt(5, 30), _prompt(6, 2)]


def write_smollm2_tokenizer(directory: Path, cache: Path) -> dict[str, int]:
    """Copy SmolLM2's byte-level BPE tokenizer files (the ``smollm2_tokenizer_files`` fixture's
    ``cache``), whose pre-tokenizer llama.cpp's converter knows, into ``directory``.
    Returns the config fields it implies."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in cache.iterdir():
        shutil.copy(file, directory / file.name)
    return dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def write_sentencepiece_tokenizer(directory: Path) -> dict[str, int]:
    """A 320-piece sentencepiece BPE model trained here (byte fallback, no dummy prefix, as
    Gemma's), as ``tokenizer.model`` and, converted by transformers, ``tokenizer.json``:
    llama.cpp's converter reads Gemma 2's vocabulary from sentencepiece only."""
    import sentencepiece
    from transformers import AutoTokenizer

    from lmserve.plugins.tiny_model import _SAMPLE

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_SAMPLE.splitlines() * 4), model_prefix=str(prefix), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    prefix.with_suffix(".model").rename(directory / "tokenizer.model")
    prefix.with_suffix(".vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True}, indent=1))
    AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
    size = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).get_piece_size()
    return dict(vocab_size=size, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def write_family_model(directory: str | Path, config_class: str, *, tokenizer: dict[str, int] | None = None,
                       seed: int = 0, norm_center: float = 1.0, embedding_scale: float = 1.0,
                       projection_scale: float = 1.0, **config: Any) -> Path:
    """Save a random model of transformers' ``config_class`` (e.g. ``"Qwen3Config"``) built
    from ``config`` with ``save_pretrained``. ``tokenizer``: what the tokenizer files already
    written to ``directory`` imply (:func:`write_smollm2_tokenizer`...); None writes the tiny
    tokenizer of :mod:`lmserve.plugins.tiny_model`.

    Weights are seeded normal noise: norms ``norm_center + 0.2 noise`` (0 for Gemma's
    ``1 + weight`` norms), biases ``0.5 noise``, embeddings ``embedding_scale * noise``, every
    other tensor ``projection_scale * noise / sqrt(fan_in)`` (fan-in: the last dimension, so
    stacked experts too): unit-scale outputs, logits far from uniform. Returns ``directory``."""
    import transformers

    directory = Path(directory)
    if tokenizer is None:
        from lmserve.plugins.tiny_model import write_tiny_tokenizer

        tokenizer = dict(vocab_size=write_tiny_tokenizer(directory), bos_token_id=320, eos_token_id=322)
    options = dict(tokenizer, tie_word_embeddings=False)
    options.update(config)
    model_config = getattr(transformers, config_class)(**options)
    model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(norm_center + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                parameter.copy_(embedding_scale * noise)
            else:
                parameter.copy_(projection_scale * noise / parameter.shape[-1] ** 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def convert_to_gguf(hf_directory: str | Path, gguf_path: str | Path) -> Path:
    """``hf_directory`` as a float32 GGUF file, written by llama.cpp's own
    ``convert_hf_to_gguf.py`` (``make install-dev`` unpacks it)."""
    converter = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {converter}: run `make install-dev` "
                                f"(or point LMSERVE_LLAMA_CPP at a llama.cpp source tree)")
    result = subprocess.run([sys.executable, str(converter), str(hf_directory), "--outfile", str(gguf_path),
                             "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return Path(gguf_path)


def load_hf_model(directory: str | Path):
    """The checkpoint in HF transformers, float32, eager attention (the reference)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def hf_greedy(model, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """HF ``generate``'s greedy tokens (never stopping at an end token)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=[],
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """HF's float32 logits at every position of ``ids`` (one forward pass): ``[len(ids), vocab]``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def our_stepwise(config, model, prompt: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor]:
    """Our model through a one-sequence KV cache: prefill ``prompt`` (logits at each of its
    positions), then decode ``tokens[:-1]`` one at a time. Returns our greedy choice at
    each step and the logits ``[len(prompt) + len(tokens) - 1, vocab]``."""
    from tests.reference_kv_cache import KVCache

    kv_cache = KVCache.allocate(config, len(prompt) + len(tokens), torch.float32, "cpu")
    hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), kv_cache)
    logits = [model.compute_logits(hidden).float()]
    for step, token in enumerate(tokens[:-1]):
        hidden = model(torch.tensor([token]), torch.tensor([len(prompt) + step]), kv_cache)
        logits.append(model.compute_logits(hidden).float())
    logits = torch.cat(logits)
    return logits[len(prompt) - 1:].argmax(-1).tolist(), logits


def check_stepwise_logits(path: str | Path, hf_model, prompts: list[list[int]] = PROMPTS,
                          families=None) -> float:
    """For each prompt: our greedy tokens equal HF ``generate``'s, and our logits (prefill
    and decode steps) are within :data:`RELATIVE_TOLERANCE` of HF's on the same tokens.
    ``path``: an HF directory or a GGUF file of the same weights. Returns the worst
    relative error seen (for the record)."""
    from lmserve.backends.torch.weights import load_model

    config, model = load_model(path, families=families)
    worst = 0.0
    for ids in prompts:
        reference_tokens = hf_greedy(hf_model, ids)
        tokens, logits = our_stepwise(config, model, ids, reference_tokens)
        assert tokens == reference_tokens, f"prompt of {len(ids)}: ours {tokens}\nhf   {reference_tokens}"
        reference = hf_logits(hf_model, ids + reference_tokens[:-1])
        error = (logits - reference).abs().amax(dim=-1) / reference.abs().amax(dim=-1)
        row = int(error.argmax())
        assert error.max() <= RELATIVE_TOLERANCE, (
            f"prompt of {len(ids)}, position {row}: relative error {error[row]:.3g}")
        worst = max(worst, float(error.max()))
    return worst


#: The last engine :func:`engine_greedy` started, by (path, options): the next call on the
#: same model and options (a test runs alone, then batched) reuses it. Only one-rank
#: engines are kept (a tensor-parallel one holds the process's collective group); each
#: test module's end shuts the kept one down (:func:`close_engines`, tests/backends/families/conftest.py).
_last_engine: dict[tuple, Any] = {}


def close_engines() -> None:
    for backend, _ in _last_engine.values():
        backend.shutdown()
    _last_engine.clear()


def _engine(path: str | Path, options: dict[str, Any]):
    """A started backend for ``path`` with ``options`` and its output queue, reused from the
    previous call when both are the same (the previous other one is shut down)."""
    from lmserve.backends.torch.factory import EngineConfig, create_backend

    key = (str(path), tuple(sorted(options.items())))
    if key not in _last_engine:
        close_engines()
        backend = create_backend(path, EngineConfig(**options))
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        backend.start(lambda outs: [outputs.put(o) for o in outs])
        _last_engine[key] = (backend, outputs)
    return _last_engine[key]


atexit.register(close_engines)


def engine_greedy(path: str | Path, prompts: list[list[int]] = PROMPTS, *, batched: bool,
                  **engine_config: Any) -> list[list[int]]:
    """The paged engine's :data:`NEW_TOKENS` greedy tokens for each prompt (float32, float
    weights): one request at a time, or (``batched``) all of them submitted together with
    :data:`OTHER_REQUESTS` (whose tokens are not returned), sharing the engine's steps."""
    from lmserve.core.types import EngineRequest, SamplingParams

    options = {"dtype": "float32", "quantization": "none", "enforce_eager": True, "session_len": 256,
               "cache_block_seq_len": 16, **engine_config}
    backend, outputs = _engine(path, options)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    if options.get("tensor_parallel_size", 1) > 1:
        _last_engine.clear()  # not kept: shut down below

    def run(requests: dict[str, list[int]]) -> dict[str, list[int]]:
        tokens = {rid: [] for rid in requests}
        for rid, ids in requests.items():
            backend.submit(EngineRequest(rid, tuple(ids), params))
        finished = 0
        while finished < len(requests):
            out = outputs.get(timeout=300)
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
            finished += out.finish_reason is not None
        return tokens

    try:
        if batched:
            requests = {f"p{i}": ids for i, ids in enumerate(prompts)}
            requests.update({f"other{i}": ids for i, ids in enumerate(OTHER_REQUESTS)})
            tokens = run(requests)
            return [tokens[f"p{i}"] for i in range(len(prompts))]
        return [run({f"p{i}": ids})[f"p{i}"] for i, ids in enumerate(prompts)]
    finally:
        if options.get("tensor_parallel_size", 1) > 1:
            backend.shutdown()


def check_cached_prefixes_and_sessions(path: str | Path, **engine_config: Any) -> None:
    """Prefix caching and an interactive session's kept turn give the tokens fresh requests
    give: a prompt that shares two 16-token blocks with an earlier one (taken from the
    cache), and a session's second turn (its first turn's keys and values kept), each
    against the same prompt in an engine without prefix caching."""
    from lmserve.backends.torch.factory import EngineConfig, create_backend
    from lmserve.core.types import EngineRequest, SamplingParams

    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    shared = tuple(_prompt(8, 40))

    def run(requests: list[EngineRequest], **extra: Any) -> dict[str, tuple[list[int], int]]:
        options = {"dtype": "float32", "quantization": "none", "enforce_eager": True, "session_len": 256,
                   "cache_block_seq_len": 16, **engine_config, **extra}
        backend = create_backend(path, EngineConfig(**options))
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        backend.start(lambda outs: [outputs.put(o) for o in outs])
        results = {}
        try:
            for request in requests:  # one at a time: each may reuse what the previous kept
                backend.submit(request)
                tokens, cached = [], 0
                while True:
                    out = outputs.get(timeout=300)
                    tokens.extend(out.new_token_ids)
                    cached = max(cached, out.num_cached_tokens or 0)
                    if out.finish_reason is not None:
                        break
                results[request.request_id] = (tokens, cached)
        finally:
            backend.shutdown()
        return results

    turn_1 = tuple(_prompt(9, 13))
    cached = run([EngineRequest("first", shared + (5, 6), greedy), EngineRequest("cached", shared + (7, 8), greedy),
                  EngineRequest("turn-1", turn_1, greedy)], enable_prefix_caching=True)
    turn_2 = turn_1 + tuple(cached["turn-1"][0]) + (10, 11, 12)
    # One engine: the session's second turn, then the same prompts as fresh requests (no
    # session, no prefix caching: computed from scratch).
    kept = run([EngineRequest("turn-1", turn_1, greedy, session_key="s", keep_kv=True),
                EngineRequest("turn-2", turn_2, greedy, session_key="s", keep_kv=True),
                EngineRequest("fresh-cached", shared + (7, 8), greedy), EngineRequest("fresh-turn-2", turn_2, greedy)])
    assert cached["cached"][1] == 32, "the shared blocks were not taken from the cache"
    assert cached["cached"][0] == kept["fresh-cached"][0]
    assert kept["turn-2"][1] >= len(turn_1), "the session's first turn was not kept"
    assert kept["fresh-turn-2"][1] == 0
    assert kept["turn-2"][0] == kept["fresh-turn-2"][0]


def server_greedy_texts(server, prompts: list[list[int]] = PROMPTS, *, concurrently: bool) -> list[str]:
    """``/v1/completions`` texts of :data:`NEW_TOKENS` greedy tokens for each token-id prompt
    (special tokens kept), one request at a time or all at once."""

    def complete(ids: list[int]) -> str:
        with server.client() as client:
            response = client.post("/v1/completions", json={
                "model": client.get("/v1/models").json()["data"][0]["id"], "prompt": ids,
                "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "skip_special_tokens": False})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

    if not concurrently:
        return [complete(ids) for ids in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(complete, prompts))


def check_engine(path: str | Path, expected: list[list[int]], prompts: list[list[int]] = PROMPTS,
                 **engine_config: Any) -> None:
    """The paged engine gives ``expected`` for ``prompts`` alone and in one continuous batch."""
    assert engine_greedy(path, prompts, batched=False, **engine_config) == expected
    assert engine_greedy(path, prompts, batched=True, **engine_config) == expected


def check_gguf(gguf: str | Path, hf_model) -> None:
    """A GGUF file of ``hf_model``'s weights: stepwise logits, and the engine alone and batched."""
    check_stepwise_logits(gguf, hf_model)
    check_engine(gguf, [hf_greedy(hf_model, ids) for ids in PROMPTS])


def check_http(server_factory, directory: str | Path, expected: list[list[int]],
               prompts: list[list[int]] = PROMPTS, *server_args: str) -> None:
    """A server on ``directory`` (``lmserve_server_factory``) answers ``/v1/completions`` with
    the texts of ``expected``, one request at a time and all at once."""
    texts = decode_texts(directory, expected)
    server = server_factory(*server_args, model=directory)
    try:
        assert server_greedy_texts(server, prompts, concurrently=False) == texts
        assert server_greedy_texts(server, prompts, concurrently=True) == texts
    finally:
        server.stop()


def decode_texts(directory: str | Path, token_lists: list[list[int]]) -> list[str]:
    """What the server's detokenizer makes of ``token_lists`` (the tiny tokenizer, special tokens kept)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    return [tokenizer.decode(tokens, skip_special_tokens=False) for tokens in token_lists]


#: A position is decided when float32's top logit leads the next by more than this share
#: of the logits' standard deviation: bfloat16's own error (about 0.04 of it on the tiny
#: models, HF's and ours alike) cannot reorder it. Random tiny models have many near-ties.
DECIDED_MARGIN = 0.05


def check_bf16_agreement(path: str | Path, hf_model, positions: int = 500, seed: int = 7,
                         families=None) -> float:
    """Teacher-forced on ``positions`` random tokens, our model in bfloat16 against HF's in
    float32: top-1 agreement >= 99% at the decided positions (:data:`DECIDED_MARGIN`), and a
    typical error (the median over positions of max|ours - hf| / std(hf)) at most 1.25 times
    HF's own bfloat16 model's. Returns our agreement over all positions (for the record)."""
    from lmserve.backends.torch.weights import load_model
    from tests.reference_kv_cache import KVCache

    ids = _prompt(seed, positions)
    config, model = load_model(path, dtype=torch.bfloat16, families=families)
    kv_cache = KVCache.allocate(config, positions, torch.bfloat16, "cpu")
    ours = model.compute_logits(model(torch.tensor(ids), torch.arange(positions), kv_cache)).float()
    reference = hf_logits(hf_model, ids)
    hf_bf16 = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), ids)
    spread = reference.std(-1)
    top2 = reference.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) / spread > DECIDED_MARGIN
    agree = ours.argmax(-1) == reference.argmax(-1)
    decided_agreement = float(agree[decided].float().mean())
    assert decided.sum() >= positions // 2, f"only {int(decided.sum())} decided positions"
    assert decided_agreement >= 0.99, f"bfloat16 top-1 agreement {decided_agreement:.3f} at decided positions"
    error = float(((ours - reference).abs().amax(-1) / spread).median())
    hf_error = float(((hf_bf16 - reference).abs().amax(-1) / spread).median())
    assert error <= 1.25 * hf_error, f"bfloat16 error {error:.3g} of the spread, HF's own {hf_error:.3g}"
    return float(agree.float().mean())
