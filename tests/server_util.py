"""Helpers of the HTTP server tests: SSE parsing, raw sockets, idle-engine checks."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import requests


def sse_data(lines: requests.Response | Iterator[bytes]) -> Iterator[str]:
    """The ``data:`` payloads of an SSE response (or of an iterator over its lines)."""
    if isinstance(lines, requests.Response):
        lines = lines.iter_lines(decode_unicode=False)
    for line in lines:
        if line.startswith(b"data:"):
            yield line[5:].strip().decode()


def sse_json(lines: requests.Response | Iterator[bytes]) -> tuple[list[dict[str, Any]], bool]:
    """(the JSON events, whether the stream ended with ``[DONE]``)."""
    events, done = [], False
    for data in sse_data(lines):
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    return events, done


def wait_idle(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict:
    """Poll ``/server_info`` until nothing runs or waits; return the last info."""
    deadline = time.monotonic() + timeout
    while True:
        info = requests.get(url + "/server_info", headers=headers, timeout=30).json()
        if info["running"] == 0 and info["waiting"] == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {info['running']} running")
        time.sleep(0.05)


def assert_kv_idle(url: str, headers: dict[str, str] | None = None) -> None:
    """The idle KV invariant, as ``/server_info`` reports it."""
    kv = wait_idle(url, headers=headers)["kv_slots"]
    assert kv["protected"] == 0 and kv["owned_by_requests"] == 0, kv
    assert kv["free"] + kv["evictable"] == kv["total"], kv


def raw_post(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a JSON POST over a plain socket (the caller reads and closes it)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read from ``sock`` until ``marker`` appears (or the peer closes)."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
