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


def test_engine_options_come_from_engine_config() -> None:
    from sgl_dsl.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--disable-radix-cache", "--max-total-tokens", "4096", "--dtype", "float32"]
    )
    options = {n: getattr(args, n) for n in args.engine_fields if hasattr(args, n)}
    assert options == {"disable_radix_cache": True, "max_total_tokens": 4096, "dtype": "float32"}
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 30000, None)
    assert "model" not in args.engine_fields and "num_threads" in args.engine_fields


def test_runtime_starts_serves_a_program_and_shuts_down() -> None:
    import sgl_dsl as sgl

    @sgl.function
    def hello(s):
        s += "Say hello:" + sgl.gen("x", max_tokens=3, temperature=0)

    with sgl.Runtime(num_threads=1, max_total_tokens=4096) as runtime:
        state = hello.run(backend=runtime)
        assert state.error() is None and state["x"]
        assert runtime.get_server_info()["max_total_tokens"] == 4096
        process = runtime.process
    assert process.returncode == 0
