"""Extract structured records from free text with JSON-schema constraints.

python examples/json_extraction.py

Two ways to give the schema to ``gen(json_schema=...)``:
- a plain dict (JSON Schema): the output is parsed with ``json.loads`` and checked with the
  ``jsonschema`` package;
- a pydantic model class: the output is parsed straight into the model with
  ``Model.model_validate_json``.

The constraint guarantees the *form* (every output parses and validates); the tiny model
decides the *content*, which is usually right for short, explicit texts like these.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
from pydantic import BaseModel, Field

import sgl_dsl as sgl

# ---- 1. people, with a dict schema ---------------------------------------------------------

PEOPLE = [
    "Maria Lopez is a 34-year-old nurse who lives in Madrid.",
    "Our new intern, Tom Becker (22), moved to Berlin to work as a software developer.",
    "At 61, retired teacher Ana Silva still walks every morning along the beach in Lisbon.",
]

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "occupation": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "occupation", "city"],
    "additionalProperties": False,
}


# ---- 2. events, with a pydantic model ------------------------------------------------------

EVENTS = [
    "The Riverside Jazz Night takes place on 2025-07-12 at the Old Harbour Hall; "
    "tickets cost 25 euros and about 300 guests are expected.",
    "Join us for the Spring Book Fair on 2025-04-03 in the City Library. "
    "Entry is free and we expect 120 visitors.",
    "The annual Tech Meetup will be held on 2025-11-20 at Union Station Hub, "
    "with 80 attendees and a 10 dollar entry fee.",
]


class Event(BaseModel):
    title: str = Field(max_length=40)
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")  # ISO date, enforced while decoding
    venue: str = Field(max_length=40)
    attendees: int = Field(ge=0, le=100000)
    ticket_price: float = Field(ge=0)
    free_entry: bool
    category: Literal["music", "books", "technology", "sport", "other"]


# ---- the programs --------------------------------------------------------------------------

# One worked example per task (a "one-shot" turn) shows the tiny model what to copy where;
# without it, it tends to invent ages. The example answers are written compactly, the way
# the constrained decoder writes JSON.
PERSON_EXAMPLE = (
    "Lena Park is a 45-year-old pilot from Seoul.",
    {"name": "Lena Park", "age": 45, "occupation": "pilot", "city": "Seoul"},
)
EVENT_EXAMPLE = (
    "The Harbour Film Night is on 2025-09-05 at the Pier Cinema; tickets cost 8 euros and "
    "150 people are expected.",
    Event(
        title="Harbour Film Night",
        date="2025-09-05",
        venue="Pier Cinema",
        attendees=150,
        ticket_price=8,
        free_entry=False,
        category="other",
    ),
)
PERSON_REQUEST = "\nGive the person's name, age, occupation and city as JSON."
EVENT_REQUEST = (
    "\nGive the event's title, date, venue, number of attendees, ticket price, whether "
    "entry is free, and its category as JSON."
)


def compact(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


@sgl.function
def extract_person(s, text):
    s += sgl.system("You extract facts from text and answer only with JSON.")
    s += sgl.user("Text: " + PERSON_EXAMPLE[0] + PERSON_REQUEST)
    s += sgl.assistant(compact(PERSON_EXAMPLE[1]))
    s += sgl.user("Text: " + text + PERSON_REQUEST)
    s += sgl.assistant(sgl.gen("record", json_schema=PERSON_SCHEMA, max_tokens=64))


@sgl.function
def extract_event(s, text):
    s += sgl.system("You extract facts from text and answer only with JSON.")
    s += sgl.user("Text: " + EVENT_EXAMPLE[0] + EVENT_REQUEST)
    s += sgl.assistant(EVENT_EXAMPLE[1].model_dump_json())  # compact JSON too
    s += sgl.user("Text: " + text + EVENT_REQUEST)
    # a pydantic model class is turned into its JSON schema
    s += sgl.assistant(sgl.gen("record", json_schema=Event, max_tokens=96))


def main() -> None:
    engine = sgl.Engine()
    sgl.set_default_backend(engine)

    print("== people (dict schema, validated with jsonschema) ==")
    states = extract_person.run_batch([{"text": t} for t in PEOPLE], temperature=0)
    for text, state in zip(PEOPLE, states):
        record = json.loads(state["record"])
        jsonschema.validate(record, PERSON_SCHEMA)  # raises if the output did not conform
        print("text  :", text)
        print("record:", record)
        print()

    print("== events (pydantic model) ==")
    states = extract_event.run_batch([{"text": t} for t in EVENTS], temperature=0)
    for text, state in zip(EVENTS, states):
        event = Event.model_validate_json(state["record"])  # a validated Event object
        print("text  :", text)
        print("event :", repr(event))
        print()

    meta = state.get_meta_info("record")
    print(
        f"last extraction: {meta['completion_tokens']} tokens, "
        f"{engine.get_stats()['jump_forward_tokens']} tokens jumped forward in all "
        "(keys and punctuation the schema forces are not decoded one by one)"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
