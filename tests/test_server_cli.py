"""``python -m sgl_dsl serve`` as a real subprocess: ready line, requests, clean SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_then_sigterm() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "sgl_dsl", "serve", "--port", str(port), "--num-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline, ready, seen = time.monotonic() + 180, None, []
        while ready is None:
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "no ready line:\n" + "".join(seen)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            ready = re.search(r"sgl-dsl server ready at (http://\S+) \(model (.+)\)", line)
        url = ready.group(1)
        assert url == f"http://127.0.0.1:{port}"
        assert ready.group(2) == "SmolLM2-135M-Instruct"
        assert requests.get(url + "/health", timeout=30).status_code == 200
        body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        r = requests.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
