"""One program, three remote backends: SGLang's native protocol and OpenAI's (two modes).

python examples/remote_backends.py                       # starts our server on a free port
python examples/remote_backends.py --url http://127.0.0.1:30000 --native   # sgl-dsl / SGLang
python examples/remote_backends.py --url http://localhost:8000 --model NAME --api-key KEY

The same ``@sgl.function`` (roles, ``gen`` with a stop string, ``select`` and a JSON-schema
``gen``) runs unchanged on:

- ``sgl.RuntimeEndpoint(url)``: SGLang's native ``/generate`` protocol. ``select`` scores
  every choice with prompt log-probabilities, exactly as on the in-process engine;
- ``sgl.OpenAI(model, base_url=url + "/v1", is_chat_model=False)``: ``/v1/completions``
  with the state's text (the chat template is applied on the client);
- ``sgl.OpenAI(..., is_chat_model=True)``: ``/v1/chat/completions`` with the state's
  messages (the server applies its template). On both OpenAI modes ``select`` becomes a
  regex-constrained greedy generation and ``json_schema`` travels as ``json_schema`` /
  ``response_format``, which vLLM, SGLang and our server accept.

By default the script starts our own server (``sgl.Runtime(num_threads=1)``, the embedded
model in a subprocess) and uses all three. With ``--url`` it talks to any server instead:
``--native`` says that it also speaks SGLang's native protocol (an SGLang server, or
``sgl-dsl serve``); otherwise only the OpenAI backends are used. ``--model`` defaults to the
first model the server lists at ``/v1/models``.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

import sgl_dsl as sgl

CITIES = ["Paris", "Tokyo", "Nairobi"]

FACTS_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["city", "country"],
}


@sgl.function
def city_facts(s, city):
    # A system turn keeps the prompt identical whichever side applies the chat template.
    s += sgl.system("You are a concise travel assistant.")
    s += sgl.user("In one sentence, what is " + city + " known for?")
    s += sgl.assistant(sgl.gen("summary", max_tokens=32, stop="\n"))
    s += sgl.user("Is " + city + " the capital of its country? Answer yes or no.")
    s += sgl.assistant(sgl.select("capital", choices=["yes", "no"]))
    s += sgl.user("Give the city's name and country as JSON.")
    s += sgl.assistant(sgl.gen("facts", json_schema=FACTS_SCHEMA, max_tokens=40))


def first_model(url: str, api_key: str | None) -> str:
    """The first model id listed at ``/v1/models``."""
    request = urllib.request.Request(url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start our own)")
    parser.add_argument("--model", help="model name for the OpenAI API (default: listed)")
    parser.add_argument("--api-key", help="API key of the server, if it needs one")
    parser.add_argument(
        "--native", action="store_true", help="the --url server speaks SGLang's /generate"
    )
    args = parser.parse_args()

    runtime = None
    if args.url is None:
        print("starting our server (sgl-dsl serve) in a subprocess ...")
        runtime = sgl.Runtime(num_threads=1)
        url, native, api_key = runtime.url, True, None
        print("server ready at", url)
    else:
        url, native, api_key = args.url.rstrip("/"), args.native, args.api_key
    try:
        model = args.model or first_model(url, api_key)
    except OSError as exc:  # connection refused, 401 without the right --api-key, ...
        raise SystemExit(f"cannot list the models of {url}: {exc}") from None
    print("model:", model)

    backends = {}
    if native:
        backends["RuntimeEndpoint"] = (
            runtime.endpoint if runtime else sgl.RuntimeEndpoint(url, api_key=api_key)
        )
    openai_options = {"base_url": url + "/v1", "api_key": api_key or "EMPTY"}
    backends["OpenAI completions"] = sgl.OpenAI(model, is_chat_model=False, **openai_options)
    backends["OpenAI chat"] = sgl.OpenAI(model, is_chat_model=True, **openai_options)

    results, timings = {}, {}
    for name, backend in backends.items():
        start = time.perf_counter()
        states = city_facts.run_batch([{"city": c} for c in CITIES], backend=backend, temperature=0)
        timings[name] = time.perf_counter() - start
        for state in states:
            if state.error() is not None:
                raise RuntimeError(f"{name}: the program failed: {state.error()}")
        results[name] = []
        for state in states:
            facts = json.loads(state["facts"])  # always valid JSON: the schema constrains it
            results[name].append(
                {
                    "summary": state["summary"].strip(),
                    "capital": state["capital"],
                    "facts": f"{facts['city']}, {facts['country']}",
                }
            )

    # Side by side: one column per backend.
    width = 28
    print()
    print(f"{'':<16}" + "".join(f"{name:<{width + 2}}" for name in backends))
    for i, city in enumerate(CITIES):
        print(city)
        for field in ("summary", "capital", "facts"):
            cells = [shorten(results[name][i][field], width) for name in backends]
            print(f"  {field:<14}" + "".join(f"{cell:<{width + 2}}" for cell in cells))
        same = all(results[name][i] == results[next(iter(backends))][i] for name in backends)
        print(f"  {'same results':<14}{same}")
    print()
    print(f"{'seconds':<16}" + "".join(f"{timings[n]:<{width + 2}.2f}" for n in backends))
    for name, backend in backends.items():
        if isinstance(backend, sgl.OpenAI):
            usage = backend.token_usage
            print(
                f"{name} token_usage: prompt_tokens={usage.prompt_tokens}, "
                f"completion_tokens={usage.completion_tokens}"
            )

    for backend in backends.values():
        backend.shutdown()  # closes the HTTP connections
    if runtime is not None:
        runtime.shutdown()  # stops the server subprocess


if __name__ == "__main__":
    main()
