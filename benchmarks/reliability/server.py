"""`python -m sgl_dsl serve` as a subprocess, and what the load test reads from a server.

Contract: `ServerProcess(args)` starts the CLI on a free loopback port and returns once the
ready line is printed (or raises with the output so far); `.url`, `.pid`, `.memory_mb()`
(VmRSS and VmHWM from /proc), `.terminate()` (SIGTERM, then the exit code). `kv_idle(url)`
waits until nothing runs and returns the KV accounting, `kv_problem(kv)` says what breaks
the idle invariant (None when it holds).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"sgl-dsl server ready at (http://\S+)")


class ServerProcess:
    """The CLI server in a child process (see the module docstring)."""

    def __init__(self, args: list[str], start_timeout_s: float = 300.0) -> None:
        cmd = [sys.executable, "-m", "sgl_dsl", "serve", "--port", "0", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.output))
            try:
                found = READY.search(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if found:
                self.url = found.group(1)
                return

    def _pump(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            lines.put(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory_mb(self) -> dict[str, float]:
        """Current (VmRSS) and peak (VmHWM) resident memory of the server, in MiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return {"rss_mb": int(fields["VmRSS"]) / 1024, "hwm_mb": int(fields["VmHWM"]) / 1024}

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM; the exit code (killed and -9 after `timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        """The exit code once the process ends by itself (killed and -9 after `timeout_s`)."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def kv_idle(url: str, timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> dict:
    """Wait until the server runs and queues nothing; its ``kv_slots`` accounting."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = requests.get(url + "/server_info", headers=headers, timeout=30).json()
        if info["running"] == 0 and info["waiting"] == 0:
            return info["kv_slots"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server is still busy: {info['running']} running")
        time.sleep(0.05)


def kv_problem(kv: dict[str, Any]) -> str | None:
    """None when the idle invariant holds (nothing protected or owned, free + evictable ==
    total), else what breaks it."""
    if kv["protected"] or kv["owned_by_requests"]:
        return f"slots still held when idle: {kv}"
    if kv["free"] + kv["evictable"] != kv["total"]:
        return f"free + evictable != total: {kv}"
    return None


def healthy(url: str) -> bool:
    """``/health`` and ``/health_generate`` both answer 200."""
    health = requests.get(url + "/health", timeout=30).status_code
    return health == 200 and requests.get(url + "/health_generate", timeout=120).status_code == 200
