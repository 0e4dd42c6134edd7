"""``Runtime``: start our HTTP server (``sgl-dsl serve``) as a subprocess and talk to it.

Contract: the constructor returns once ``/health`` answers (or raises with the server's log
tail if it exits or ``launch_timeout`` passes); ``.endpoint`` is a ready
:class:`~sgl_dsl.backends.runtime_endpoint.RuntimeEndpoint`; the process is stopped by
``shutdown()``, by leaving a ``with`` block, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from sgl_dsl.backends.runtime_endpoint import RuntimeEndpoint


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _flags(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, str(value)]
    return out


class Runtime:
    """A server subprocess on the embedded model (or ``model_path``); engine options are the
    server's flags (``max_total_tokens=4096`` -> ``--max-total-tokens 4096``)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        launch_timeout: float = 300.0,
        **options: Any,
    ) -> None:
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        cmd = [sys.executable, "-m", "sgl_dsl", "serve", "--host", host, "--port", str(self.port)]
        if model_path:
            cmd += ["--model", model_path]
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += _flags(options)
        self._log = tempfile.NamedTemporaryFile(prefix="sgl-dsl-server-", suffix=".log")  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.shutdown)
        self._wait_healthy(launch_timeout)
        self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)

    def _log_tail(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()[-3000:]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode}:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.shutdown()
        raise TimeoutError(f"the server did not become healthy in {timeout} s:\n{self._log_tail()}")

    def flush_cache(self) -> bool:
        return self.endpoint.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.endpoint.get_server_info()

    def shutdown(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
