"""The HTTP server: SGLang-native and OpenAI-compatible routes over one :class:`Engine`.

``create_app(engine, api_key=None, ...)`` builds the aiohttp application;
``ServerThread(engine, host, port=0)`` serves it from a background thread (``.url``,
``.stop()``); ``serve_forever(app, host, port)`` serves it until SIGINT / SIGTERM (the
``sgl-dsl serve`` command, in ``sgl_dsl/cli.py``). See docs/server.md.
"""

from backend.server.app import create_app
from backend.server.runner import ServerThread, serve_forever

__all__ = ["ServerThread", "create_app", "serve_forever"]
