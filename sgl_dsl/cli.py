"""The ``sgl-dsl`` command: ``sgl-dsl serve [options]`` (also ``python -m sgl_dsl serve``).

Contract:
- ``serve`` loads an engine (the embedded SmolLM2-135M-Instruct unless ``--model PATH``),
  serves the SGLang-native and OpenAI-compatible HTTP API on ``--host`` (default
  127.0.0.1) / ``--port`` (default 30000), prints one ready line
  ``sgl-dsl server ready at http://HOST:PORT (model NAME)`` (flushed) once it accepts
  connections, and on SIGINT / SIGTERM closes the server, shuts the engine down and exits 0.
- Engine options are generated from the fields of ``backend.config.EngineConfig``:
  ``--field-name VALUE`` with the field's type; booleans are flags (``--disable-radix-cache``;
  ``--no-...`` for a field whose default is true). Options left out keep their defaults.
- Heavy imports (torch, aiohttp) happen only when a command runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from backend.config import EngineConfig

_SERVER_OWN = ("model",)  # EngineConfig fields with their own, hand-written option


def _field_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; a plain type as it is."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_engine_options(parser: argparse.ArgumentParser) -> list[str]:
    """One option per ``EngineConfig`` field (defaults suppressed); returns the field names."""
    group = parser.add_argument_group("engine options (backend.config.EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    names = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in _SERVER_OWN:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction if default else "store_true",
                default=argparse.SUPPRESS,
                help=f"(default: {default})",
            )
        else:
            group.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=f"(default: {default})",
            )
        names.append(f.name)
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgl-dsl", description="sgl-dsl: structured generation with a local engine."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the SGLang-native and OpenAI-compatible HTTP API",
        description="Serve a model over HTTP (SGLang-native routes and OpenAI's /v1 routes).",
    )
    serve.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        metavar="PATH",
        help="a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=30000, help="port (default: 30000; 0 = any)")
    serve.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (not for /health)"
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model name /v1/models lists (default: the model path, or "
        "SmolLM2-135M-Instruct for the embedded model)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=32 * 2**20,
        help="largest request body accepted; larger ones get 413 (default: 32 MiB)",
    )
    serve.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging level (default: warning)",
    )
    serve.set_defaults(engine_fields=add_engine_options(serve))
    return parser


def serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until SIGINT / SIGTERM, shut down; the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A SIGTERM while the model loads exits cleanly too (the server installs its own handler).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    options = {name: getattr(args, name) for name in args.engine_fields if hasattr(args, name)}

    from backend.engine import Engine
    from backend.server import create_app, serve_forever
    from backend.server.memory import fix_malloc_thresholds
    from backend.server.state import STATE

    fix_malloc_thresholds()  # a flat RSS over long runs (see backend/server/memory.py)

    try:
        engine = Engine(args.model, **options)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sgl-dsl serve: cannot load the engine: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading
        return 0
    try:
        app = create_app(
            engine,
            api_key=args.api_key,
            served_model_name=args.served_model_name,
            max_request_bytes=args.max_request_bytes,
        )
        name = app[STATE].served_model_name

        def ready(url: str) -> None:
            print(f"sgl-dsl server ready at {url} (model {name})", flush=True)

        serve_forever(app, args.host, args.port, on_ready=ready)
    except OSError as exc:  # e.g. the port is taken
        print(f"sgl-dsl serve: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":
    sys.exit(main())
