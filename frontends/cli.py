"""The ``lmserve`` command.

    lmserve serve api_server MODEL [--server-port 23333] ...
    lmserve serve api_client URL [--api-key KEY] [--session-id N]
    lmserve serve gradio URL [--server-name HOST] [--server-port 6006]
    lmserve chat MODEL [--session-id N] ...
    lmserve plugins [--json]
    lmserve templates [MODEL] [--chat-template X]

``--plugin module.path`` (repeatable, anywhere on the line) registers a plugin
module before the parsers are built, so its options show up in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from lmserve.core.config import CHAT, DEVICES, DTYPES, LOG_LEVELS, SERVE_API_SERVER, SERVE_RAY, ServeConfig
from lmserve.core.model_source import ModelNotFoundError
from lmserve.core.plugins import PluginError, call_safely, create_plugin_manager, list_plugins
from lmserve.core.startup import resolve_model
from lmserve.core.template_choice import HF, ChatTemplateRegistry
from lmserve.frontends.api_client import APIClient, no_models_listed
from lmserve.frontends.http.http_config import HTTPConfig
from lmserve.frontends.lmdeploy_flags import API_SERVER, GRADIO, add_lmdeploy_flags, lmdeploy_notices, log_level
from lmserve.frontends.terminal_chat import chat_in_terminal


def _plugin_modules(argv: Sequence[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    return known.plugin


def _env_api_keys() -> list[str] | None:
    value = os.environ.get("LMSERVE_API_KEYS", "")
    return value.replace(",", " ").split() or None


class _Parser(argparse.ArgumentParser):
    """Reads ``--session_len`` as ``--session-len`` (LMDeploy's parser does, and its docs write
    both) where only the dashed spelling is one of this parser's options."""

    def parse_known_args(self, args=None, namespace=None):
        args = [self._dashed(arg) for arg in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _dashed(self, arg: str) -> str:
        key, equals, value = arg.partition("=")
        dashed = "--" + key[2:].replace("_", "-")
        if key.startswith("--") and key not in self._option_string_actions and dashed in self._option_string_actions:
            return dashed + equals + value
        return arg


def build_parser(pm) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="Import MODULE and register it as a plugin (repeatable).",
    )
    parser = _Parser(prog="lmserve", description="Serve LLMs behind an OpenAI-compatible API.", parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="Run a server.")
    _add_serve_commands(serve.add_subparsers(dest="server", required=True, metavar="SERVER"), common, pm)
    _add_chat_command(commands, common, pm)
    _add_listing_commands(commands, common, pm)
    return parser


def _add_serve_commands(servers, common: argparse.ArgumentParser, pm) -> None:
    """``lmserve serve``'s servers: api_server and ray (a model behind the API), api_client and
    gradio (in front of a running server)."""
    api_server = servers.add_parser(
        "api_server", parents=[common], help="Serve MODEL over the OpenAI-compatible REST API.",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(api_server)
    _add_api_server_options(api_server)
    call_safely(pm, "lmserve_add_cli_options", command=SERVE_API_SERVER, parser=api_server)
    add_lmdeploy_flags(api_server, API_SERVER)

    ray = servers.add_parser(
        "ray", parents=[common], formatter_class=_HelpFormatter,
        help="Serve MODEL over the same API, its engines as replicas on Ray Serve (needs `pip install "
        "lmserve[ray]`); interactive sessions stay on their replica.",
    )
    _add_model_argument(ray)
    _add_api_server_options(ray)
    call_safely(pm, "lmserve_add_cli_options", command=SERVE_RAY, parser=ray)

    api_client = servers.add_parser(
        "api_client", help="Chat with a server in the terminal, in one of its interactive sessions.",
        formatter_class=_HelpFormatter,
    )
    api_client.add_argument("url", metavar="URL", help="The server, e.g. http://localhost:23333.")
    _add_api_key_option(api_client)
    _add_session_id_option(api_client)
    _add_generation_options(api_client)

    gradio = servers.add_parser(
        "gradio", help="Serve a chat page over a running api_server (needs `pip install lmserve[webui]`).",
        formatter_class=_HelpFormatter,
    )
    gradio.add_argument("url", metavar="URL", help="The api_server, e.g. http://localhost:23333.")
    gradio.add_argument("--server-name", default="0.0.0.0", metavar="HOST", help="Host the page binds.")
    gradio.add_argument("--server-port", type=int, default=6006, metavar="PORT", help="Port the page binds.")
    _add_api_key_option(gradio)
    add_lmdeploy_flags(gradio, GRADIO)


def _add_chat_command(commands, common: argparse.ArgumentParser, pm) -> None:
    """``lmserve chat``: a model loaded in this process, a conversation in the terminal."""
    chat = commands.add_parser(
        "chat", parents=[common], help="Chat in the terminal with MODEL, loaded in this process (no server).",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(chat)
    _add_model_options(chat)
    chat.add_argument("--log-level", default=ServeConfig.log_level, type=log_level, choices=LOG_LEVELS,
                      help="Logging level.")
    _add_session_id_option(chat)
    _add_generation_options(chat)
    call_safely(pm, "lmserve_add_cli_options", command=CHAT, parser=chat)
    add_lmdeploy_flags(chat, CHAT)


def _add_listing_commands(commands, common: argparse.ArgumentParser, pm) -> None:
    """``lmserve plugins`` and ``lmserve templates``: what this installation has, without serving."""
    plugins = commands.add_parser("plugins", parents=[common], help="List the loaded plugins.")
    plugins.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    call_safely(pm, "lmserve_add_cli_options", command="plugins", parser=plugins)

    templates = commands.add_parser(
        "templates", parents=[common], help="List the chat templates, and which one MODEL would get.",
        formatter_class=_HelpFormatter,
    )
    templates.add_argument("model", metavar="MODEL", nargs="?", default=None,
                           help="Say which template serving MODEL would use, and why (no weights load).")
    _add_chat_template_option(templates)
    call_safely(pm, "lmserve_add_cli_options", command="templates", parser=templates)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing (not None, not off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL",
        help="A local HF directory, a .gguf file, or a hub id found in the local hub cache "
        "or shipped by an installed package.",
    )


def _add_api_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=os.environ.get("LMSERVE_API_KEY") or None, metavar="KEY",
                        help="Send 'Authorization: Bearer KEY'. Default: $LMSERVE_API_KEY, which keeps "
                        "it out of the process list.")


def _add_session_id_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session-id", type=int, default=None, metavar="N",
                        help="The interactive session to chat in (its history is kept on the server); "
                        "default: a new one whose id the server makes, so nobody else can guess it.")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (each turn)")
    group.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="Most tokens of a reply.")
    group.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature (0: greedy).")
    group.add_argument("--top-p", type=float, default=0.8, help="Nucleus sampling's probability mass.")
    group.add_argument("--top-k", type=int, default=40, help="Sample among the K most likely tokens (0: all).")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="Penalty of tokens already seen.")


def _generation(args: argparse.Namespace) -> dict:
    """The arguments of each turn's request (checked by the server, which answers a bad one with 400)."""
    return {"request_output_len": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model-name", default=None, metavar="NAME", help="The model name served in /v1/models (default: MODEL).")
    model.add_argument("--session-len", type=int, default=None, metavar="TOKENS", help="Context length in tokens (default: the model's).")
    model.add_argument("--device", default=ServeConfig.device, help=f"One of {', '.join(DEVICES)} or cuda:N; auto picks CUDA when present.")
    model.add_argument("--dtype", default=ServeConfig.dtype, choices=DTYPES, help="Weights and KV dtype; auto: bfloat16 on CPUs with native bf16 matmul (AMX, AVX512-BF16), else float32; bfloat16/float16 on CUDA.")
    _add_chat_template_option(model)
    model.add_argument("--meta-instruction", default=None, metavar="TEXT",
                       help="The default system prompt, for conversations that start without a system message.")
    model.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help="How tool calls are read from outputs of requests with tools: hermes (Qwen2.5, "
                       "<tool_call>), llama3 (Llama 3.1 JSON), internlm (InternLM2 <|action_start|>), or a "
                       "plugin's. Default: the one that fits the chat template, else hermes.")
    model.add_argument("--reasoning-parser", default=None, metavar="NAME",
                       help="How a thinking model's reasoning is split out of its replies into "
                       "reasoning_content: default (<think>...</think>: Qwen3, QwQ, DeepSeek-R1; LMDeploy's "
                       "qwen-qwq, deepseek-r1 and intern-s1 name it too), deepseek-v3, none, or a plugin's. "
                       "Default: the one the chat template writes, else none.")
    model.add_argument("--generation-config", default="auto", metavar="auto|vllm|none|DIR",
                       help="Sampling defaults of requests that leave temperature, top_p, top_k, min_p, "
                       "repetition_penalty or max_tokens unset: auto, the model's own (generation_config.json, "
                       "or a GGUF file's sampling metadata); DIR, the generation_config.json in DIR; vllm, none "
                       "or lmdeploy, this server's (1.0, 1.0, off, 0, 1.0, all the room left).")


def _add_api_server_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--server-name", default=ServeConfig.server_name, metavar="HOST", help="Host to bind.")
    server.add_argument("--server-port", type=int, default=ServeConfig.server_port, metavar="PORT",
                        help="Port to bind.")
    server.add_argument("--log-level", default=ServeConfig.log_level, type=log_level, choices=LOG_LEVELS,
                        help="Logging level.")
    server.add_argument("--shutdown-timeout", type=float, default=HTTPConfig.shutdown_timeout, metavar="SECONDS",
                        help="On SIGTERM or Ctrl+C, seconds in-flight requests may run on before they are aborted.")
    server.add_argument("--disable-docs", "--disable-fastapi-docs", action="store_true",
                        help="Serve neither /openapi.json nor the Swagger UI.")
    server.add_argument("--max-log-len", type=int, default=None, metavar="N",
                        help="The request log (--log-level INFO) prints at most N characters of each prompt and N "
                        "of its token ids (default: all).")
    server.add_argument("--swagger-ui-cdn", action="store_true",
                        help="The Swagger UI page at / loads its scripts and styles from a public CDN instead of "
                        "this server's installed copy.")

    security = parser.add_argument_group("security")
    security.add_argument("--api-keys", nargs="*", default=_env_api_keys(), metavar="KEY",
                          help="Require 'Authorization: Bearer KEY' (any of these keys) on /v1/*, /tokenize and "
                          "/detokenize (given without keys: none). Default: the keys in $LMSERVE_API_KEYS (comma- or "
                          "space-separated), which keeps them out of the process list.")
    security.add_argument("--allow-origins", nargs="+", default=None, metavar="ORIGIN",
                          help="Origins allowed by CORS ('*': any); without it no CORS headers are sent.")
    security.add_argument("--allow-methods", nargs="+", default=list(HTTPConfig.allow_methods), metavar="METHOD",
                          help="Methods allowed by CORS.")
    security.add_argument("--allow-headers", nargs="+", default=list(HTTPConfig.allow_headers), metavar="HEADER",
                          help="Request headers allowed by CORS.")
    security.add_argument("--allow-credentials", action="store_true", help="Allow credentials (cookies) with CORS.")
    security.add_argument("--special-tokens-in-messages", action="store_true",
                          help="Tokenize special tokens typed in messages (e.g. '<|im_start|>') as control "
                          "tokens (the old behaviour). Default: a message's text is data, its special tokens are "
                          "encoded as plain text; only the chat template's own markers are control tokens.")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-concurrent-requests", type=int, default=None, metavar="N",
                        help="Most generation requests run at once (default: unlimited).")
    limits.add_argument("--max-queued-requests", type=int, default=None, metavar="N",
                        help="Most generation requests waiting for a slot; more get 503 with Retry-After "
                        "(default: --max-concurrent-requests).")
    limits.add_argument("--max-request-bytes", type=int, default=HTTPConfig.max_request_bytes, metavar="BYTES",
                        help="Largest request body; larger ones get 413.")
    limits.add_argument("--session-ttl", type=float, default=ServeConfig.session_ttl, metavar="SECONDS",
                        help="Idle interactive sessions are ended after this many seconds (0: never).")
    limits.add_argument("--max-sessions-per-client", type=int, default=HTTPConfig.max_sessions_per_client,
                        metavar="N", help="Live interactive sessions one client may hold (a client: its API key, "
                        "or its address without keys); one more gets 429 (0: unlimited).")
    limits.add_argument("--max-session-tokens-per-client", type=int,
                        default=HTTPConfig.max_session_tokens_per_client, metavar="TOKENS",
                        help="Tokens of history one client's live sessions may hold together; a turn past it "
                        "gets 429 (0: unlimited).")
    limits.add_argument("--request-timeout", type=float, default=HTTPConfig.request_timeout, metavar="SECONDS",
                        help="Seconds a client may take to send a request's headers, and the most seconds "
                        "between two pieces of its body; a slower connection is closed.")
    limits.add_argument("--response-timeout", type=float, default=HTTPConfig.response_timeout, metavar="SECONDS",
                        help="Seconds a request may run, a stream included; past it the request is aborted "
                        "and a stream ends with an error event (0: no limit).")


def _add_chat_template_option(parser) -> None:
    parser.add_argument("--chat-template", default=None, metavar="NAME|JSON",
                        help="The chat template: a name ('lmserve templates' lists them), or a JSON file or "
                        "JSON string with LMDeploy's template fields. Default: the model's own, else a name match.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        pm = create_plugin_manager(_plugin_modules(argv))
        args = build_parser(pm).parse_args(argv)
        command = args.command if args.command != "serve" else f"serve {args.server}"
        for line in lmdeploy_notices(args, command):  # a refused flag raises: exit 2, nothing loaded
            print(f"lmserve: {line}", file=sys.stderr)
        if args.command == "plugins":
            return _plugins(pm, as_json=args.json)
        if args.command == "templates":
            return _templates(pm, args.model, args.chat_template)
        if args.command == "chat":
            return _chat(pm, args)
        if args.server == "api_client":
            return _serve_api_client(args)
        if args.server == "gradio":
            return _serve_gradio(args)
        return _serve_api_server(pm, args)
    except (PluginError, ModelNotFoundError, ValueError) as exc:
        print(f"lmserve: error: {exc}", file=sys.stderr)
        return 2


def _plugins(pm, as_json: bool) -> int:
    infos = list_plugins(pm)
    if as_json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    for info in infos:
        print(f"{info.name}  {info.version or '-'}  ({info.source})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def _templates(pm, model: str | None, chat_template: str | None) -> int:
    registry = ChatTemplateRegistry.from_plugins(pm)
    rows = [(HF, "the tokenizer's EOS", "a model that ships a Jinja chat template (tried before names)")]
    for template in registry.templates:
        names = ", ".join((template.name, *getattr(template, "aliases", ())))
        if hasattr(template, "match_rule"):
            rule = template.match_rule
        else:
            rule = "its own rule" if hasattr(template, "matches") else "(by name only)"
        rows.append((names, " ".join(template.stop_words) or "-", rule))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    print(f"{'NAME':<{widths[0]}}  {'STOP WORDS':<{widths[1]}}  MATCHES")
    for names, stop_words, rule in rows:
        print(f"{names:<{widths[0]}}  {stop_words:<{widths[1]}}  {rule}")
    if model is None:
        return 0
    # Resolved as the server resolves it, the tokenizer included; no weights load.
    choice = resolve_model(pm, ServeConfig(model=model, chat_template=chat_template)).template_choice
    print(f"\n{model} gets {choice.template.name!r}: {choice.reason}.")
    print("A first turn renders as:")
    print(choice.template.render([{"role": "user", "content": "Hello!"}], add_generation_prompt=True))
    return 0


def _serve_config(args: argparse.Namespace, **server) -> ServeConfig:
    """The config of a command that loads MODEL (``server``: the api_server's own settings)."""
    return ServeConfig(
        model=args.model,
        model_name=args.model_name,
        **server,
        session_len=args.session_len,
        log_level=args.log_level,
        device=args.device,
        dtype=args.dtype,
        chat_template=args.chat_template,
        meta_instruction=args.meta_instruction,
        tool_call_parser=args.tool_call_parser,
        plugins=tuple(args.plugin),
        options=vars(args),
    )


def _configure_logging(config: ServeConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve_api_server(pm, args: argparse.Namespace) -> int:
    config = _serve_config(args, server_name=args.server_name, server_port=args.server_port,
                           session_ttl=args.session_ttl)
    HTTPConfig.from_options(config.options)  # bad flags fail here, before the weights load
    _configure_logging(config)
    # Sanic is imported only by the command that serves.
    from lmserve.frontends.http.app import build_state, create_app
    from lmserve.frontends.http.loading import LoadingServer

    loading = LoadingServer(config.server_name, config.server_port)
    try:
        loading.start()  # the port answers 503 until the server itself takes it
    except OSError as exc:
        raise ValueError(f"cannot listen on {config.server_name}:{config.server_port}: {exc.strerror or exc}") from exc
    try:
        state = build_state(config, pm)
        app = create_app(state, pm)
    finally:
        loading.stop()
    app.run(
        host=config.server_name,
        port=config.server_port,
        single_process=True,
        motd=False,
        access_log=config.log_level == "DEBUG",
    )
    # Sanic returns after SIGTERM/SIGINT once in-flight requests finished or
    # --shutdown-timeout passed (frontends/http/shutdown.py); a backend that failed
    # (a tensor-parallel rank died) stopped it with SIGTERM too.
    if state.bus.backend.failure is not None:
        print(f"lmserve: error: the engine failed: {state.bus.backend.failure}", file=sys.stderr)
        return 1
    return 0


def _chat(pm, args: argparse.Namespace) -> int:
    _check_session_id(args.session_id)
    config = _serve_config(args, session_ttl=0)  # the person at the terminal may pause for long
    _configure_logging(config)
    from lmserve.frontends.local_chat import chat_locally  # sanic and the engine load only now

    status, state = chat_locally(config, pm, args.session_id, sys.stdin, sys.stdout, _generation(args))
    if state.bus.backend.failure is not None:
        print(f"lmserve: error: the engine failed: {state.bus.backend.failure}", file=sys.stderr)
        return 1
    return status


def _serve_gradio(args: argparse.Namespace) -> int:
    try:
        from lmserve.frontends.webui import serve_webui
    except ImportError as exc:
        print(f"lmserve: error: the web UI needs gradio ({exc}): pip install 'lmserve[webui]'", file=sys.stderr)
        return 2
    return serve_webui(args.url, server_name=args.server_name, server_port=args.server_port, api_key=args.api_key)


def _check_session_id(session_id: int | None) -> None:
    if session_id is not None and session_id < 0:
        raise ValueError(f"--session-id must be >= 0 (-1 is a one-shot request, kept nowhere), got {session_id}.")


def _serve_api_client(args: argparse.Namespace) -> int:
    _check_session_id(args.session_id)
    with APIClient(args.url, api_key=args.api_key) as api_client:
        if api_client.available_models is None:
            print(f"lmserve: error: {no_models_listed(api_client)}", file=sys.stderr)
            return 1
        return chat_in_terminal(api_client, args.session_id, sys.stdin, sys.stdout, generation=_generation(args))


if __name__ == "__main__":
    sys.exit(main())
