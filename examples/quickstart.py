"""Quickstart: a structured-generation program on the embedded model (runs offline on CPU).

python examples/quickstart.py
"""

import json

import sgl_dsl as sgl


@sgl.function
def city_report(s, city):
    s += sgl.system("You are a concise travel assistant.")
    s += sgl.user("In one sentence, what is " + city + " known for?")
    s += sgl.assistant(sgl.gen("summary", max_tokens=40, stop="\n"))
    # select: score the choices on the cached prompt, keep the most likely one
    s += sgl.user("Is " + city + " a capital city? Answer yes or no.")
    s += sgl.assistant(sgl.select("capital", choices=["yes", "no"]))
    # fork: two continuations share the prompt through the radix cache
    forks = s.fork(2)
    for fork, topic in zip(forks, ["food", "a landmark"]):
        fork += sgl.user("Name " + topic + " of " + city + " in a few words.")
        fork += sgl.assistant(sgl.gen("tip", max_tokens=16, stop="\n"))
    forks.join()
    # JSON schema: the output is guaranteed to parse and validate
    s += sgl.user("Give the city's name and country as JSON.")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30},
                       "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
    }  # fmt: skip
    s += sgl.assistant(sgl.gen("facts", json_schema=schema, max_tokens=40))


def main() -> None:
    engine = sgl.Engine()  # the embedded SmolLM2-135M-Instruct
    sgl.set_default_backend(engine)
    states = city_report.run_batch(
        [{"city": "Paris"}, {"city": "Tokyo"}], temperature=0, progress_bar=False
    )
    for state in states:
        print("summary :", state["summary"].strip())
        print("capital :", state["capital"])
        print("tips    :", [t.strip() for t in state["tip"]])
        print("facts   :", json.loads(state["facts"]))
        print("cached  :", state.get_meta_info("facts")["cached_tokens"], "prompt tokens reused")
        print()
    print("engine  :", {k: v for k, v in engine.get_stats().items() if k in
                        ("requests", "cache_hit_rate", "generated_tokens")})  # fmt: skip
    engine.shutdown()


if __name__ == "__main__":
    main()
