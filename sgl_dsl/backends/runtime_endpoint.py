"""``RuntimeEndpoint``: programs on any server speaking SGLang's native HTTP protocol
(a real SGLang server, or ours from ``sgl-dsl serve``).

Contract: requests are ``POST /generate`` calls made with one shared aiohttp session on the
runtime loop, so concurrent programs become concurrent HTTP requests that the server batches.
The chat template is, in order: the named one asked for, the Jinja template the server reports
in ``/get_model_info`` (when it is expressible as role prefixes), or one guessed from the
model path.
"""

from __future__ import annotations

import atexit
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

from sgl_dsl.backends.base import BaseBackend
from sgl_dsl.chat_template import (
    ChatTemplate,
    JinjaChatRenderer,
    chat_template_from_tokenizer,
    get_chat_template,
    get_chat_template_by_model_path,
)
from sgl_dsl.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob

if TYPE_CHECKING:
    from sgl_dsl.interpreter import StreamExecutor
    from sgl_dsl.ir import SglSamplingParams

logger = logging.getLogger(__name__)


class HTTPError(RuntimeError):
    """A server answered with an error status; the message is the server's."""


class BadRequestError(HTTPError, ValueError):
    """The server refused the request as invalid (a 4xx status)."""


def server_error(where: str, status: int, body: str) -> HTTPError:
    """The exception for an error answer, with the server's own message when it sent one."""
    try:
        error = json.loads(body).get("error", body)
        message = error.get("message", body) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = body
    cls = BadRequestError if 400 <= status < 500 else HTTPError
    return cls(f"{where}: HTTP {status}: {message}")


def http_json(
    url: str, body: Any = None, api_key: str | None = None, method: str | None = None
) -> Any:
    """A blocking JSON request for the few calls made from user threads."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        raise server_error(url, e.code, e.read().decode(errors="replace")) from None
    return json.loads(raw) if raw.strip() else None


def _template_for(info: dict[str, Any], name: str | None) -> ChatTemplate:
    if name:
        return get_chat_template(name)
    source = info.get("chat_template")
    if source:
        renderer = JinjaChatRenderer(
            source,
            info.get("model_path", "server"),
            info.get("bos_token") or "",
            info.get("eos_token") or "",
        )
        try:
            return chat_template_from_tokenizer(renderer)
        except Exception as e:  # fall back to the named template for this model
            logger.warning("server chat template not usable (%s); guessing by model path", e)
    return get_chat_template_by_model_path(info.get("model_path", ""))


_SESSIONS: set[aiohttp.ClientSession] = set()  # open sessions, closed at interpreter exit


@atexit.register
def _close_sessions() -> None:
    """SGLang's endpoint needs no explicit shutdown, so ours closes what is left at exit."""
    from sgl_dsl.runtime_loop import spawn

    for session in list(_SESSIONS):
        if not session.closed:
            spawn(session.close()).result(timeout=10)
    _SESSIONS.clear()


class RuntimeEndpoint(BaseBackend):
    support_concate_and_append = False

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: Any = None,
        chat_template_name: str | None = None,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model_info: dict[str, Any] = http_json(
            self.base_url + "/get_model_info", None, api_key
        )
        self.chat_template = _template_for(self.model_info, chat_template_name)
        self._session: aiohttp.ClientSession | None = None

    def get_model_name(self) -> str:
        return self.model_info.get("model_path", self.base_url)

    # ---- HTTP ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                connector=aiohttp.TCPConnector(limit=0),
            )
            _SESSIONS.add(self._session)
        return self._session

    async def _post(self, data: dict[str, Any]) -> Any:
        async with self._client().post(self.base_url + "/generate", json=data) as response:
            body = await response.text()
            if response.status != 200:
                raise server_error("/generate", response.status, body)
            return json.loads(body)

    # ---- generation ------------------------------------------------------------------------

    def _request(self, s: StreamExecutor, params: SglSamplingParams) -> dict[str, Any]:
        data: dict[str, Any] = {"text": s.text_, "sampling_params": params.to_srt_kwargs()}
        data.update(params.request_kwargs())
        if params.return_text_in_logprobs is not None:
            data["return_text_in_logprobs"] = params.return_text_in_logprobs
        return data

    async def generate(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        out = await self._post(self._request(s, sampling_params))
        if isinstance(out, list):
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    async def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        data = {**self._request(s, sampling_params), "stream": True}
        sent = 0
        async with self._client().post(self.base_url + "/generate", json=data) as response:
            if response.status != 200:
                raise server_error("/generate", response.status, await response.text())
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise HTTPError(f"/generate stream: {event['error']}")
                text = event["text"]
                yield text[sent:], event["meta_info"]
                sent = len(text)

    async def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError("select picks deterministically: its temperature must be 0")
        # Cache the prompt and learn its length, then score prompt+choice for every choice in
        # one batch, from two tokens before the prompt's end: the prompt's own entry in that
        # batch tells where each choice's tokenization departs from the prompt's.
        cached = await self._post({"text": s.text_, "sampling_params": {"max_new_tokens": 0}})
        start = max(cached["meta_info"]["prompt_tokens"] - 2, 0)
        out = await self._post(
            {
                "text": [s.text_] + [s.text_ + c for c in choices],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": start,
            }
        )
        prompt_ids = [t[1] for t in out[0]["meta_info"]["input_token_logprobs"]]
        scored = []
        for r in out[1:]:
            tokens = r["meta_info"]["input_token_logprobs"]
            same = 0
            while (
                same < len(prompt_ids)
                and same < len(tokens)
                and tokens[same][1] == prompt_ids[same]
            ):
                same += 1
            scored.append([list(t) for t in tokens[same:] if t[0] is not None])
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            unconditional = await self._unconditional(scored)
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=[mean_logprob(t) for t in scored],
            input_token_logprobs=scored,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )

    async def _unconditional(self, scored: list[list[Any]]) -> list[list[Any]]:
        """Each choice's tokens scored without the prompt: after the BOS token when the server
        reports one, else the first token counts as log 1 = 0.0."""
        bos = self.model_info.get("bos_token_id")
        ids = [([bos] if bos is not None else []) + [t[1] for t in row] for row in scored]
        wanted = [i for i, x in enumerate(ids) if len(x) > 1]
        result: list[list[Any]] = [[] for _ in scored]
        if wanted:
            out = await self._post(
                {
                    "input_ids": [ids[i] for i in wanted],
                    "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True,
                    "logprob_start_len": 1,
                }
            )
            for i, r in zip(wanted, out):
                result[i] = [list(t) for t in r["meta_info"]["input_token_logprobs"]]
        if bos is None:
            for row, first in zip(result, scored):
                if first:
                    row.insert(0, [0.0, first[0][1], None])
        return result

    async def _prefill(self, text: str) -> None:
        if text:
            await self._post({"text": text, "sampling_params": {"max_new_tokens": 0}})

    async def commit_lazy_operations(self, s: StreamExecutor) -> None:
        await self._prefill(s.text_)

    async def cache_prefix(self, prefix: str) -> None:
        await self._prefill(prefix)

    # ---- blocking helpers ------------------------------------------------------------------

    def flush_cache(self) -> bool:
        http_json(self.base_url + "/flush_cache", None, self.api_key, method="POST")
        return True

    def get_server_info(self) -> dict[str, Any]:
        return http_json(self.base_url + "/server_info", None, self.api_key)

    def shutdown(self) -> None:
        if self._session is not None and not self._session.closed:
            from sgl_dsl.runtime_loop import spawn

            spawn(self._session.close()).result(timeout=10)
            _SESSIONS.discard(self._session)
