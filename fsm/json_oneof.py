"""Reasoning about `oneOf` branches: summaries, disjointness and separating conditions.

A `Summary` over-approximates the values a schema accepts (every valid value fits it), so
two branches whose summaries share no value share no valid value (`disjoint`), and a value
that fails a branch's summary fails the branch (`separator`). Summaries are built by
`fsm.json_schema` from the translated members of a branch; this module only reasons on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
SCALARS = (str, bool, type(None))


@dataclass
class Summary:
    """Facts every value valid against a schema satisfies (absent fields: no fact)."""

    types: set[str]
    """The value's JSON type is among these ("number" comes with "integer")."""
    values: list[Any] | None = None
    """The value is one of these."""
    props: dict[str, Summary] = field(default_factory=dict)
    """An object's member `k`, when present, fits `props[k]`."""
    extra: Summary | None = None
    """An object's members with keys outside `props`, when present, fit this."""
    required: set[str] = field(default_factory=set)
    """An object has these keys."""
    closed: set[str] | None = None
    """An object has no keys outside this set."""
    max_props: int | None = None
    """An object has at most this many keys."""
    items: Summary | None = None
    """Every item of an array fits this."""
    min_items: int = 0
    """An array has at least this many items."""


ANY = Summary(set(TYPES))


def union(summaries: list[Summary]) -> Summary:
    """A summary of the values fitting any of `summaries`."""
    if not summaries:
        return Summary(set())
    if len(summaries) == 1:
        return summaries[0]
    values = None
    if all(s.values is not None for s in summaries):
        values = [v for s in summaries for v in s.values or ()]
    out = Summary(set().union(*(s.types for s in summaries)), values)
    objects = [s for s in summaries if "object" in s.types]
    if objects:
        out.required = set.intersection(*(s.required for s in objects))
        keys = sorted(set().union(*(s.props for s in objects)))
        out.props = {k: union([prop(s, k) or ANY for s in objects]) for k in keys}
        if all(s.extra is not None for s in objects):
            out.extra = union([s.extra for s in objects if s.extra is not None])
        if all(s.closed is not None for s in objects):
            out.closed = set().union(*(s.closed or () for s in objects))
        if all(s.max_props is not None for s in objects):
            out.max_props = max(s.max_props or 0 for s in objects)
    arrays = [s for s in summaries if "array" in s.types]
    if arrays:
        if all(s.items is not None for s in arrays):
            out.items = union([s.items for s in arrays if s.items is not None])
        out.min_items = min(s.min_items for s in arrays)
    return out


def meet(a: Summary, b: Summary) -> Summary:
    """A summary of the values fitting both `a` and `b`."""
    values = a.values if b.values is None else b.values
    if a.values is not None and b.values is not None:
        values = [v for v in a.values if any(json_equal(v, w) for w in b.values)]
    closed = a.closed if b.closed is None else b.closed
    if a.closed is not None and b.closed is not None:
        closed = a.closed & b.closed
    maxima = [m for m in (a.max_props, b.max_props) if m is not None]
    return Summary(
        types=a.types & b.types,
        values=values,
        props={**b.props, **a.props},
        extra=a.extra if a.extra is not None else b.extra,
        required=a.required | b.required,
        closed=closed,
        max_props=min(maxima) if maxima else None,
        items=a.items if a.items is not None else b.items,
        min_items=max(a.min_items, b.min_items),
    )


def disjoint(a: Summary, b: Summary) -> bool:
    """Whether no JSON value fits both summaries."""
    shared = a.types & b.types
    if not shared:
        return True
    if a.values is not None and b.values is not None:
        return not any(json_equal(v, w) for v in a.values for w in b.values)
    return all(
        (t == "object" and _objects_disjoint(a, b)) or (t == "array" and _arrays_disjoint(a, b))
        for t in shared
    )


def prop(s: Summary, key: str) -> Summary | None:
    """What an object's member `key` fits, when present (None: nothing known)."""
    return s.props.get(key, s.extra)


def _objects_disjoint(a: Summary, b: Summary) -> bool:
    for key in a.required | b.required:  # present in every object fitting both
        pa, pb = prop(a, key), prop(b, key)
        if pa is not None and pb is not None and disjoint(pa, pb):
            return True
    for x, y in ((a, b), (b, a)):
        if y.closed is not None and x.required - y.closed:
            return True
        if y.max_props is not None and len(x.required) > y.max_props:
            return True
    return False


def _arrays_disjoint(a: Summary, b: Summary) -> bool:
    if a.items is None or b.items is None or not (a.min_items or b.min_items):
        return False
    return disjoint(a.items, b.items)


def separator(a: Summary, b: Summary) -> dict | None:
    """A schema that, added to branch `a`, guarantees that branch `b` fails (or None).

    Objects and arrays shared with `b` are kept under a condition that fails `b`; other
    shared types are dropped from `a` (with "integer", "number" too: the rest of the
    numbers cannot be told apart by type). None when nothing of `a` would remain.
    """
    if b.values is not None:  # b accepts only these values: a must avoid those it could take
        relevant = [v for v in b.values if json_type(v) in a.types]
        if all(isinstance(v, SCALARS) for v in relevant):
            return {"not": {"enum": relevant}} if relevant else {}
    shared = a.types & b.types
    conditions: dict[str, Any] = {}
    kept = a.types - shared
    if "object" in shared and (cond := _object_separator(a, b)) is not None:
        conditions.update(cond)
        kept.add("object")
    arrays = "array" in shared and a.items is not None and b.items is not None
    if arrays and disjoint(a.items, b.items):  # a non-empty array of a's items fails b
        conditions["minItems"] = max(a.min_items, 1)
        kept.add("array")
    if "integer" in shared:
        kept.discard("number")
    if not kept:
        return None
    if kept != a.types:
        named = sorted(kept - {"integer"} if "number" in kept else kept, key=TYPES.index)
        conditions["type"] = named
    return conditions


def _object_separator(a: Summary, b: Summary) -> dict | None:
    """Keywords (applying to objects only) under which an object of `a` fails `b`."""
    for key in sorted(set(a.props) | set(b.props)):
        pa, pb = prop(a, key), prop(b, key)
        if pa is not None and pb is not None and disjoint(pa, pb):  # present, it fails b
            return {"required": [key]}
    missing = sorted(b.required - a.required)
    if missing:
        return {"anyOf": [{"properties": {k: False}} for k in missing]}
    if b.closed is not None and a.closed is not None:
        outside = sorted(a.closed - b.closed)
        if outside:
            return {"anyOf": [{"required": [k]} for k in outside]}
    if b.max_props is not None and len(a.required) > b.max_props:
        return {}
    for key in sorted(b.required & set(a.props) & set(b.props)):
        inner = separator(a.props[key], b.props[key])
        if inner is not None:  # b requires the key, whose value then fails b's schema for it
            return {"properties": {key: inner}}
    return None


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers, 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


def json_type(value: Any) -> str:
    """The JSON Schema type name of a decoded JSON value ("integer" for ints)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    names = {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}
    return names[type(value)]
