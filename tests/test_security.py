"""Security of the HTTP server: loopback bind by default, the API key on every route but
``/health``, request body and prompt length limits, and no path from a request to the
filesystem or to code evaluation. Real server, real HTTP."""

from __future__ import annotations

import ast
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from backend.engine import Engine
from backend.server import ServerThread
from backend.server.app import OPEN_PATHS
from sgl_dsl.cli import build_parser

SERVER_DIR = Path(__file__).resolve().parents[1] / "backend" / "server"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(engine: Engine) -> Iterator[ServerThread]:
    with ServerThread(engine, api_key=KEY, max_request_bytes=64 * 1024) as srv:
        yield srv


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(srv: ServerThread, path: str, body: object, **kw: object) -> requests.Response:
    return requests.post(srv.url + path, json=body, headers=auth(), timeout=120, **kw)


# ---------------------------------------------------------------------- bind address


def external_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_loopback_bind_by_default(engine: Engine) -> None:
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    with ServerThread(engine) as srv:
        assert srv.host == "127.0.0.1"
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        addr = external_address()
        if addr is not None:  # the port is closed on the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((addr, srv.port), timeout=5).close()


# ---------------------------------------------------------------------- API key


def routes(srv: ServerThread) -> list[tuple[str, str]]:
    """Every (method, path) the application serves, path parameters filled in."""
    out = set()
    for route in srv.app.router.routes():
        path = route.resource.canonical.replace("{model}", "x").replace("{id}", "x")
        assert "{" not in path, f"fill in the parameters of {path}"
        out.add((route.method, path))
    return sorted(out)


def test_api_key_on_every_route_but_health(keyed: ServerThread) -> None:
    served = routes(keyed)
    assert len(served) >= 20 and ("POST", "/v1/chat/completions") in served
    for method, path in served:
        for headers in ({}, auth("wrong"), {"X-API-Key": "wrong"}, {"Authorization": KEY}):
            r = requests.request(method, keyed.url + path, headers=headers, timeout=60)
            if path in OPEN_PATHS:
                assert r.status_code == 200, (method, path)
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
                if method != "HEAD":
                    assert "API key" in r.json()["error"]["message"]
        for headers in (auth(), {"X-API-Key": KEY}):
            r = requests.request(method, keyed.url + path, headers=headers, timeout=120)
            assert r.status_code not in (401, 500), (method, path, r.text)
    r = requests.get(keyed.url + "/no/such/route", timeout=30)
    assert r.status_code == 401  # unknown routes tell nothing without the key


# ---------------------------------------------------------------------- size limits


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_body_limit(keyed: ServerThread, path: str) -> None:
    big = json.dumps({"text": "x" * 100_000}).encode()
    r = requests.post(keyed.url + path, data=big, headers=auth(), timeout=60)
    assert r.status_code == 413 and str(64 * 1024) in r.json()["error"]["message"]
    # without a Content-Length (chunked), the limit holds while reading
    r = requests.post(keyed.url + path, data=iter([big[:50_000], big[50_000:]]), headers=auth())
    assert r.status_code == 413, r.text
    assert post(keyed, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}).ok


def test_prompt_length_limit(keyed: ServerThread, engine: Engine) -> None:
    limit = engine.context_len
    cases = [
        ("/generate", {"text": "word " * 12_000}),
        ("/generate", {"input_ids": [1000] * limit}),
        ("/v1/completions", {"model": "x", "prompt": [[1000] * limit]}),
        (
            "/v1/chat/completions",
            {"model": "x", "messages": [{"role": "user", "content": "a " * 12_000}]},
        ),
    ]
    for path, body in cases:
        r = post(keyed, path, body)
        assert r.status_code == 400, (path, r.text)
        message = r.json()["error"]["message"]
        assert "context length" in message and str(limit) in message, message
    r = post(keyed, "/generate", {"text": ["a"] * 5000, "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- no files, no eval


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "file:///etc/passwd"},
        {"$ref": "/etc/passwd"},
        {"$id": "file:///etc/", "$ref": "passwd"},
        {"$ref": "http://127.0.0.1:1/schema.json"},
        {"properties": {"a": {"$ref": "file:///etc/hostname#/x"}}},
    ],
)
def test_schema_refs_never_reach_files_or_urls(keyed: ServerThread, schema: dict) -> None:
    params = {"max_new_tokens": 8, "json_schema": json.dumps(schema)}
    r = post(keyed, "/generate", {"text": "x", "sampling_params": params})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("invalid constraint") and "$ref" in message, message
    assert "root:" not in message


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/generate", "model_path"),
        ("/generate", "tokenizer_path"),
        ("/generate", "chat_template"),
        ("/v1/chat/completions", "chat_template"),
        ("/v1/chat/completions", "chat_template_kwargs"),
        ("/v1/chat/completions", "tokenizer"),
        ("/v1/completions", "model_path"),
    ],
)
def test_file_selecting_fields_are_refused(keyed: ServerThread, path: str, field: str) -> None:
    body: dict = {"model": "x", "max_tokens": 1}
    if path == "/generate":
        body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    elif path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "x"}]
    else:
        body["prompt"] = "x"
    r = post(keyed, path, {**body, field: "/etc/passwd"})
    assert r.status_code == 400 and repr(field) in r.json()["error"]["message"], r.text


def test_model_field_is_not_a_path(keyed: ServerThread) -> None:
    """``model`` is echoed as the served name and selects nothing."""
    messages = [{"role": "user", "content": "Name a colour."}]
    outs = []
    for model in ("x", "/etc/passwd", "../../../../root/.ssh/id_rsa", "file:///dev/zero"):
        body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
        r = post(keyed, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        outs.append((r.json()["model"], r.json()["choices"][0]["message"]["content"]))
    assert len(set(outs)) == 1 and outs[0][0] == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "content",
    [
        "{{ raise_exception('evaluated') }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}",
    ],
)
def test_message_content_is_not_a_template(keyed: ServerThread, content: str) -> None:
    """Chat content is data for the template, never template code."""
    body = {"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    r = post(keyed, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text


def test_regex_is_not_python(keyed: ServerThread) -> None:
    for regex in ["(?P<x>a)(?P=x)", "(a)\\1", "(?(1)a|b)"]:
        params = {"max_new_tokens": 4, "regex": regex}
        r = post(keyed, "/generate", {"text": "x", "sampling_params": params})
        assert r.status_code == 400, (regex, r.text)


FORBIDDEN_CALLS = {"eval", "exec", "compile", "open", "__import__", "input", "breakpoint"}
FORBIDDEN_MODULES = {"os", "subprocess", "pickle", "marshal", "shutil", "importlib", "shelve"}
FORBIDDEN_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "unlink"}
ALLOWED_IMPORTS = {"importlib.metadata"}  # the package version, for /server_info


def forbidden(module: str) -> bool:
    return module.split(".")[0] in FORBIDDEN_MODULES and module not in ALLOWED_IMPORTS


def test_server_code_has_no_file_or_eval_calls() -> None:
    """The request path (``backend/server``) never calls eval/exec/open, file methods, or
    os / subprocess / pickle / importlib (anything that would turn a field into a file
    read or code)."""
    found = []
    for path in sorted(SERVER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names if forbidden(a.name)]
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
                found += [f"{path.name}: from-import {n}" for n in names if forbidden(n)]
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno}: {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
                found.append(f"{path.name}:{node.lineno}: .{func.attr}()")
    assert not found, found
