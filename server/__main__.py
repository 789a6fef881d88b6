"""`llm-service serve|...`: argument parsing only; everything else lives in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from types import FrameType

from server import __version__
from server.config import (
    CPU_PLACEMENTS,
    DEFAULT_EMBEDDING_MODEL_NAME,
    DEFAULT_MODEL_NAME,
    DTYPES,
    ENGINES,
    EXECUTOR_BACKENDS,
    SCHEDULING_POLICIES,
    SPECULATIVE_METHODS,
    TOOL_CALL_FORMATS,
    Settings,
    SettingsError,
)

ENV_PREFIX = "LLM_SERVICE_"
# read elsewhere, not flags: the cache folder, and the test suite's own settings
_OTHER_ENV = ("LLM_SERVICE_CACHE", "LLM_SERVICE_TEST_")


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (default: the embedded SmolLM2-135M-Instruct).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Every flag can also be given as an environment variable, {ENV_PREFIX}<FLAG> "
               f"(--database-url: {ENV_PREFIX}DATABASE_URL; on/off flags take 1/0, true/false); "
               "the command line wins. Repeatable flags take a comma-separated list.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE",
                   help="local HF folder, .gguf file, or hub id (default: the embedded SmolLM2-135M-Instruct, "
                        "source 'default'); repeat it to serve several models, each named NAME=SOURCE")
    m.add_argument("--embedding-model", default=None, metavar="SOURCE|none",
                   help=f"the embedding model served beside the chat model as {DEFAULT_EMBEDDING_MODEL_NAME} "
                        "(/v1/embeddings): 'default' (the embedded all-MiniLM-L6-v2), a local folder or hub id, "
                        "or 'none' to serve no embedding model")
    m.add_argument("--served-model-name", default=None, help=f"model id clients use for the one --model (default: {DEFAULT_MODEL_NAME} for the default model, else --model)")
    m.add_argument("--models-file", default=None,
                   help="YAML file of models (name, source, engine, settings, preload) and aliases (see README)")
    m.add_argument("--cache-dir", default=None, help="where converted and downloaded models are kept (default: $LLM_SERVICE_CACHE or $XDG_CACHE_HOME/llm-service)")
    m.add_argument("--trust-remote-code", action="store_true", default=None, help="allow a model's own Python code from the hub")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="0.0.0.0")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="auto", choices=list(ENGINES),
                   help="auto: vLLM where it is installed and supports this machine, else transformers")
    e.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    e.add_argument("--dtype", default="auto", choices=list(DTYPES))
    e.add_argument("--gpu-memory-utilization", type=float, default=None, help="fraction of accelerator memory for weights + KV cache (on CPU: of RAM)")
    e.add_argument("--kv-cache-space", type=float, default=None, help="KV cache size in GiB (CPU default: min(4, RAM/4))")
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--pipeline-parallel-size", type=int, default=1)
    e.add_argument("--distributed-executor-backend", default=None, choices=list(EXECUTOR_BACKENDS),
                   help="how vLLM runs tensor/pipeline-parallel workers: mp (one machine) or ray "
                        "(several machines in a Ray cluster, GPUs only: vLLM's CPU build cannot use Ray; "
                        "default: vLLM's choice)")
    e.add_argument("--cpu-placement", default="auto", choices=list(CPU_PLACEMENTS),
                   help="on CPU, the cores an engine's threads use. auto: vLLM's workers are bound to every core "
                        "(each to its NUMA node's, or to an equal share) below 8 cores per worker, else as vLLM "
                        "does; the transformers engine runs a torch thread per physical core. default: each "
                        "engine's own (vLLM keeps one core per worker for its front end). VLLM_CPU_OMP_THREADS_BIND "
                        "or VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM), OMP_NUM_THREADS (transformers) win over both")
    e.add_argument("--speculative", default=None, choices=list(SPECULATIVE_METHODS),
                   help="vLLM: speculative decoding. ngram (prompt lookup): the tokens that followed the answer's "
                        "last n-gram where it appeared earlier are proposed, and the model checks them in one "
                        "step; pays off when answers repeat their prompt (rewrite, extract, edit code). Requests "
                        "with min_p or logit_bias are then refused (vLLM cannot combine them)")
    e.add_argument("--num-speculative-tokens", type=int, default=4, help="--speculative: tokens proposed per step")
    e.add_argument("--prompt-lookup-max", type=int, default=4, help="--speculative ngram: the longest n-gram looked up")
    e.add_argument("--prompt-lookup-min", type=int, default=2, help="--speculative ngram: the shortest n-gram looked up")
    e.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch (transformers default: 32)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one forward pass (transformers: prompt tokens prefilled per step, default 1024)")
    e.add_argument("--enforce-eager", action="store_true", default=None,
                   help="vLLM: run without torch.compile / CUDA graphs: starts ~4x faster on CPU, decodes 7-16%% slower "
                        "(the transformers engine always runs eagerly)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes that earlier requests computed (vLLM's flag; "
                        "the transformers engine has a prefix cache of its own)")
    e.add_argument("--seed", type=int, default=0, help="engine seed for requests that give none")
    e.add_argument("--max-logprobs", type=int, default=20, help="most top_logprobs a request may ask for")
    e.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                   help="vLLM: serve waiting requests in arrival order (fcfs) or by each request's priority, "
                        "lower first (priority; under fcfs a request's priority is not passed to vLLM). "
                        "The transformers engine always admits waiting requests by priority, then arrival")
    e.add_argument("--tool-call-format", default="auto", choices=list(TOOL_CALL_FORMATS),
                   help="how the model writes tool calls: hermes (<tool_call>{...}</tool_call>), llama3_json, "
                        "mistral ([TOOL_CALLS]); auto reads it from the chat template, and uses hermes (with tools "
                        "described in the system turn) for templates that know no tools")
    mm = p.add_argument_group("many models")
    mm.add_argument("--memory-budget", type=float, default=None,
                    help="GiB the models may hold together (GPU memory with a GPU, else RAM); a model "
                         "that would not fit is refused (507) (default: 90%% of the device's memory)")
    mm.add_argument("--evict-idle", action="store_true", default=None,
                    help="make room for a model by unloading the least recently used idle lazy models")
    mm.add_argument("--idle-unload", type=float, default=None, metavar="SECONDS",
                    help="unload a lazy model (preload: false) after this many seconds without requests")
    mm.add_argument("--load-wait", type=float, default=60.0, metavar="SECONDS",
                    help="how long a request waits for its lazy model to load before a 503 with Retry-After")
    o = p.add_argument_group("operations")
    o.add_argument("--api-key", action="append", default=None,
                   help="a key every /v1 request must present as 'Authorization: Bearer KEY' (repeatable)")
    o.add_argument("--api-keys-file", default=None,
                   help="YAML or JSON file of keys with names and per-key limits (see README)")
    o.add_argument("--metrics-require-key", action="store_true", default=None,
                   help="GET /metrics needs a key too (default: open, for Prometheus on a private network)")
    o.add_argument("--docs-require-key", action="store_true", default=None,
                   help="/openapi.json, /docs and /redoc need a key too (default: open; the interactive "
                        "page cannot send one, so use a proxy that adds it)")
    o.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests that may wait for a free slot in the engine; beyond: 429 at once")
    o.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    o.add_argument("--max-messages", type=int, default=2048, help="most messages in one chat request")
    o.add_argument("--max-tokens-limit", type=int, default=None,
                   help="most tokens one request may ask to generate (default: the context length)")
    o.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are aborted")
    o.add_argument("--database-url", default=None,
                   help="request log database, a SQLAlchemy URL (default: SQLite file in the cache folder; "
                        "PostgreSQL: postgresql+psycopg://user:password@host/db)")
    o.add_argument("--redis-url", default=None,
                   help="count per-key limits in Redis, shared by every replica that points at it "
                        "(redis://host:6379/0; default: each replica counts its own)")
    o.add_argument("--limits-on-redis-failure", choices=("open", "closed"), default="open",
                   help="when Redis fails or is slower than --redis-timeout: open (default) serves limited keys' "
                        "requests without counting them; closed refuses them with 503")
    o.add_argument("--limits-lease", type=float, default=30.0, metavar="SECONDS",
                   help="with --redis-url: a running request's concurrency slot is renewed while it runs and "
                        "freed this long after its replica dies (default 30)")
    o.add_argument("--redis-timeout", type=float, default=0.05, metavar="SECONDS",
                   help="the most a request waits on Redis before --limits-on-redis-failure decides (default 0.05)")
    o.add_argument("--log-content", action="store_true", default=None,
                   help="keep prompt and answer text in the request log (off: counts and timings only)")
    o.add_argument("--request-log-buffer", type=int, default=10000,
                   help="rows that may wait for a slow or down database; beyond, rows are dropped and counted")
    o.add_argument("--store-responses", type=_on_off, default=True, metavar="on|off",
                   help="keep Responses API responses with store: true (OpenAI's default) and conversations in "
                        "the database (off: nothing is kept; such responses answer with store: false)")
    o.add_argument("--chat-page", type=_on_off, default=True, metavar="on|off",
                   help="the chat page at / (for browsers) and /chat (off: / answers JSON only and /chat is 404)")
    o.add_argument("--response-retention", type=float, default=30.0, metavar="DAYS",
                   help="days a stored response, and a conversation after its last change, is kept (default 30)")
    o.add_argument("--files-dir", default=None,
                   help="folder for the Batch API's file contents, shared by every replica (default: in the "
                        "database when --database-url is PostgreSQL, else 'files' in the cache folder)")
    o.add_argument("--max-file-bytes", type=int, default=200 << 20,
                   help="largest file POST /v1/files takes (413 beyond; default 200 MiB, OpenAI's batch input cap)")
    o.add_argument("--batch-concurrency", type=int, default=4,
                   help="batch lines running at once on this server (interactive requests always go first; "
                        "default 4)")
    o.add_argument("--batch-window", type=float, default=86400.0, metavar="SECONDS",
                   help="what a batch's completion_window ('24h', the only value OpenAI takes) lasts here: "
                        "a batch not done by then expires (default 86400)")
    return p


def _on_off(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def env_settings(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict[str, object]:
    """`LLM_SERVICE_<FLAG>` environment variables as flag values: what containers and Kubernetes
    Secrets pass most easily, and a database password stays out of `ps`. They become the parser's
    defaults, so a flag on the command line wins. ValueError names the variable a flag would refuse."""
    values: dict[str, object] = {}
    by_name = {ENV_PREFIX + a.dest.upper(): a for a in parser._actions if a.option_strings and a.dest != "help"}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(_OTHER_ENV):
            continue
        action = by_name.get(name)
        if action is None:
            print(f"llm-service: ignoring {name}: no such flag (--{name[len(ENV_PREFIX):].lower().replace('_', '-')})",
                  file=sys.stderr)
            continue
        value = raw.strip()
        if not value:
            continue  # set but empty: as if unset (an env file's `VAR=` line)
        if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
            values[action.dest] = value.lower() in _TRUE
            continue
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(action, argparse._AppendAction) else [value]
        try:
            converted = [action.type(v) if callable(action.type) else v for v in items]
        except ValueError as e:
            raise ValueError(f"{name}={raw!r}: {e}") from None
        if action.choices is not None and any(v not in action.choices for v in converted):
            raise ValueError(f"{name}={raw!r}: must be one of {', '.join(map(str, action.choices))}")
        values[action.dest] = converted if isinstance(action, argparse._AppendAction) else converted[0]
    return values


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        """SIGTERM/SIGINT drain first: new requests get 503 and readiness goes false while running
        ones finish (up to --shutdown-timeout); then uvicorn stops and the engine aborts whatever
        is left. A second signal stops at once. uvicorn re-raises the signal after a graceful
        shutdown (exit status 143); a graceful stop is a success for supervisors here: exit 0."""

        draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state = app.state.server
            loop = state.loop
            if self.draining or loop is None or loop.is_closed():
                super().handle_exit(sig, frame)
            else:
                self.draining = True
                logging.getLogger("server").info(
                    "signal %d: draining (up to %.0f s), then stopping", sig, settings.shutdown_timeout)

                def stop() -> None:
                    self.should_exit = True

                loop.call_soon_threadsafe(lambda: state.drain(settings.shutdown_timeout, stop))
            self._captured_signals.clear()

    from server.app import create_app
    from server.auth import Keys, KeysFileError

    try:
        settings = Settings.from_mapping(vars(args))
        keys = Keys.from_settings(settings.api_key, settings.api_keys_file)
    except (SettingsError, KeysFileError) as e:
        print(f"llm-service: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fatal: list[str] = []
    server: Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal, keys=keys)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # requests are drained before uvicorn is told to stop; what is left after that is aborted
        timeout_graceful_shutdown=5,
    )
    server = Server(config)
    server.run()
    if fatal:
        names = ", ".join(m.name for m in settings.served_models)
        print(f"llm-service: could not serve {names}: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its `serve` subparser."""
    parser = argparse.ArgumentParser(prog="llm-service", description="Self-hosted, OpenAI-compatible LLM inference server.")
    parser.add_argument("--version", action="version", version=f"llm-service {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = _serve_parser(sub)
    # these parse their own flags (`llm-service chat --help`, `llm-service bench --help`, `llm-service rag --help`)
    sub.add_parser("chat", help="streaming terminal chat with any OpenAI-compatible server", add_help=False)
    sub.add_parser("bench", help="load benchmark against any OpenAI-compatible server", add_help=False)
    sub.add_parser("rag", help="index files and answer questions from them with any OpenAI-compatible server",
                   add_help=False)
    return parser, serve


def parse_serve(
    parser: argparse.ArgumentParser, serve: argparse.ArgumentParser, argv: Sequence[str] | None, environ: Mapping[str, str]
) -> tuple[argparse.Namespace, list[str]]:
    """`serve`'s arguments with `LLM_SERVICE_*` variables filling in what the command line leaves out."""
    from_env = env_settings(serve, environ)
    lists = {a.dest for a in serve._actions if isinstance(a, argparse._AppendAction)}
    # as defaults, so a flag given on the command line wins (for repeatable flags, after parsing:
    # argparse would add the command line's values to a default list instead of replacing it)
    serve.set_defaults(**{k: v for k, v in from_env.items() if k not in lists})
    args, rest = parser.parse_known_args(argv)
    for dest in lists & from_env.keys():
        if getattr(args, dest) is None:
            setattr(args, dest, from_env[dest])
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    parser, serve = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        try:
            args, rest = parse_serve(parser, serve, argv, os.environ)
        except ValueError as e:
            print(f"llm-service: {e}", file=sys.stderr)
            return 2
    if args.command == "chat":
        from clients import chat

        return chat.main(rest)
    if args.command == "rag":
        from clients import rag

        return rag.main(rest)
    if args.command == "bench":
        from benchmarks import load

        load.main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _serve(args)


# vLLM starts its engine in a child process: the guard keeps that child from serving again
if __name__ == "__main__":
    sys.exit(main())
