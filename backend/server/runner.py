"""Running the application: in a background thread (tests, notebooks) or in the foreground
until SIGINT / SIGTERM (the command line).

Contract:
- :func:`start` binds a TCP site (``port=0`` picks a free port) with handler cancellation on,
  so a client that disconnects cancels its handler (and so aborts its requests).
- :class:`ServerThread` serves an engine from its own event loop thread; ``.url`` is ready
  when the constructor returns; ``.stop()`` closes connections and joins the thread. It does
  not shut the engine down.
- :func:`serve_forever` blocks until SIGINT / SIGTERM, then closes the server (in-flight
  requests are cancelled and aborted); the caller shuts the engine down.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from backend.engine import Engine
from backend.server.app import create_app

SHUTDOWN_TIMEOUT_S = 3.0


def format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` to stop) and
    the bound port."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


class ServerThread:
    """An HTTP server for ``engine`` on a background thread.

    ``ServerThread(engine, "127.0.0.1", 0, api_key=...)`` (options of :func:`create_app`);
    ``.url`` like ``http://127.0.0.1:41234``; ``.stop()``; usable as a context manager.
    """

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int = 0, **app_options: Any
    ) -> None:
        self.host = host
        self.port = port
        self._app = create_app(engine, **app_options)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sgl-dsl-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    @property
    def url(self) -> str:
        return format_url(self.host, self.port)

    @property
    def app(self) -> web.Application:
        return self._app

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            runner, self.port = loop.run_until_complete(start(self._app, self.host, self.port))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (idempotent)."""
        if not self._stopped:
            self._stopped = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(
    app: web.Application,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; ``on_ready(url)`` once it accepts connections."""

    async def main() -> None:
        runner, bound = await start(app, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if on_ready is not None:
                on_ready(format_url(host, bound))
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
