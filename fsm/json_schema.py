"""JSON Schema to a byte-level term: the language of JSON texts that validate.

The translation is exact where an automaton can be: every string of the language is a JSON
text that validates against the schema (soundness, checked with `jsonschema` in the tests),
and keywords an automaton cannot enforce raise `ConstraintError` naming the keyword and its
location. Texts are written in one canonical form, the one `canonical_dumps` produces:

- object keys in declared order (`properties` in order of first appearance over `$ref`,
  `allOf` members and the schema itself, then `required` keys not declared), undeclared
  keys after them; optional keys may be skipped;
- no whitespace (or the `whitespace` pattern between tokens), strings with the escapes of
  `json.dumps(..., ensure_ascii=False)`, numbers as JSON writes them.

Undeclared keys follow `additionalProperties`; where a schema that declares properties
leaves it unset, they are allowed as the specification says, or not at all with
`Options(extra_properties=False)` (the engine's default: small models otherwise pad objects
with invented keys).

Further conventions: a schema without `type` is limited to the types its keywords describe
(`properties` means object, and so on), which only narrows what is generated; free-form
values (`{}`, `true`, undeclared properties) and recursive `$ref`s are expanded to a bounded
depth; unknown `format`s and annotation keywords are ignored, as the specification says.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from jsonschema import validators

from fsm import charset as cs
from fsm.errors import ConstraintError
from fsm.formats import format_regex
from fsm.json_members import members_term
from fsm.json_oneof import (
    ANY,
    SCALARS,
    TYPES,
    Summary,
    disjoint,
    json_equal,
    json_type,
    meet,
    separator,
    union,
)
from fsm.numeric import integer_range_regex, number_range_regex
from fsm.regex import regex_term
from fsm.terms import EMPTY, EPS, TermStore

_KEYWORD_TYPES = {
    "properties": "object", "required": "object", "additionalProperties": "object",
    "patternProperties": "object", "propertyNames": "object", "minProperties": "object",
    "maxProperties": "object", "dependentRequired": "object", "dependencies": "object",
    "dependentSchemas": "object", "items": "array", "prefixItems": "array",
    "additionalItems": "array", "minItems": "array", "maxItems": "array", "contains": "array",
    "uniqueItems": "array", "minLength": "string", "maxLength": "string", "pattern": "string",
    "format": "string", "minimum": "number", "maximum": "number", "exclusiveMinimum": "number",
    "exclusiveMaximum": "number", "multipleOf": "number",
}  # fmt: skip
_UNSUPPORTED = {
    "contains": "array 'contains' needs counting over arbitrary items",
    "minContains": "array 'contains' needs counting over arbitrary items",
    "maxContains": "array 'contains' needs counting over arbitrary items",
    "unevaluatedProperties": "it depends on which subschemas were evaluated",
    "unevaluatedItems": "it depends on which subschemas were evaluated",
    "$dynamicRef": "dynamic references are not supported",
    "$recursiveRef": "dynamic references are not supported",
}
_MAX_ALTERNATIVES = 64
_MAX_PATTERN_REGIONS = 3
_MAX_UNIQUE_VALUES = 32


@dataclass
class Options:
    """Translation options; `whitespace` is a regex for the gaps between JSON tokens."""

    whitespace: str | None = None
    extra_properties: bool = True  # False: no undeclared keys unless the schema asks for them
    max_ref_depth: int = 3
    any_value_depth: int = 8
    deadline: float = math.inf  # time.monotonic() limit


@dataclass
class _Object:
    """Constraints of one object type after merging `allOf` members."""

    declared: dict[str, list[Any]] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=set)


def schema_term(store: TermStore, schema: dict | bool | str, options: Options | None = None) -> int:
    """The term for the canonical JSON texts that validate against `schema`."""
    return _Translator(store, _load(schema), options or Options()).root()


def canonical_dumps(instance: Any, schema: dict | bool | str) -> str:
    """`instance` as the constrained decoder writes it for `schema` (compact, declared order)."""
    return _Translator(TermStore(), _load(schema), Options()).dumps(instance)


def _load(schema: dict | bool | str) -> dict | bool:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"json_schema must be an object or a boolean, not {schema!r:.80}")
    return schema


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _ValueSet:
    """JSON values, looked up by JSON equality (`json_equal`) through a hash of each."""

    def __init__(self, values: list[Any] | None = None) -> None:
        self._buckets: defaultdict[str, list[Any]] = defaultdict(list)
        for value in values or ():
            self.add(value)

    def add(self, value: Any) -> None:
        self._buckets[_enum_key(value)].append(value)

    def __contains__(self, value: Any) -> bool:
        return any(json_equal(value, w) for w in self._buckets.get(_enum_key(value), ()))


def _enum_key(value: Any) -> str:
    """A text equal for JSON-equal values (1 and 1.0 alike; key order ignored)."""

    def norm(x: Any) -> Any:
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, list):
            return [norm(y) for y in x]
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        return x

    return json.dumps(norm(value), sort_keys=True)


class _Translator:
    def __init__(self, store: TermStore, root: dict | bool, options: Options) -> None:
        self.s = store
        self.root_schema = root
        self.opt = options
        self._memo: dict[tuple, tuple[Any, int]] = {}
        self._summaries: dict[tuple, tuple[Any, Summary]] = {}
        self._any: dict[int, int] = {}
        self._ref_stack: list[str] = []
        self._reached: Counter[str] = Counter()
        self._root_id = root.get("$id", root.get("id")) if isinstance(root, dict) else None
        try:
            cls = validators.validator_for(root) if isinstance(root, dict) else None
        except Exception:  # an unknown $schema: validate with the latest draft
            cls = None
        self._validator = (cls or validators.Draft202012Validator)(root)
        s = store
        self.ws = EPS if options.whitespace is None else self._ws_term(options.whitespace)
        self.colon = s.seq(self.ws, s.literal(b":"), self.ws)
        self.comma = s.seq(self.ws, s.literal(b","), self.ws)
        self.quote = s.literal(b'"')
        self.json_char = cs.json_string_term(s, cs.ANY_CHAR)

    def _ws_term(self, pattern: str) -> int:
        term = regex_term(self.s, pattern)
        if any(c not in b" \t\n\r" for c in _sample_bytes(self.s, term)):
            raise ConstraintError(f"whitespace pattern {pattern!r} matches non-whitespace")
        return term

    # ------------------------------------------------------------------ entry points

    def root(self) -> int:
        return self.value(self.root_schema, "#")

    def dumps(self, instance: Any) -> str:
        return self._dumps(instance, self.root_schema, "#")

    # ------------------------------------------------------------------ values

    def value(self, schema: Any, path: str) -> int:
        """Term for the values valid against `schema` (at JSON pointer `path`)."""
        if time.monotonic() > self.opt.deadline:
            raise ConstraintError("json_schema compilation ran out of time")
        if schema is True or schema == {}:
            return self.any_value(self.opt.any_value_depth)
        if schema is False:
            return EMPTY
        if not isinstance(schema, dict):
            raise self.error(path, f"a schema must be an object or a boolean, not {schema!r:.60}")
        key = (id(schema), tuple(self._ref_stack))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not schema:
            hit = self._memo[key] = (schema, self._value(schema, path))  # keeps `schema` alive
        return hit[1]

    def _value(self, schema: dict, path: str) -> int:
        saved = self._ref_stack
        self._reached = Counter(saved)
        alternatives = self.alternatives(schema, path)
        # Subschemas of the members count the $refs that led to any member as entered.
        self._ref_stack = list(self._reached.elements())
        try:
            return self.s.alt(*(self.conjunction(members, path) for members in alternatives))
        finally:
            self._ref_stack = saved

    def alternatives(self, schema: dict, path: str) -> list[list[tuple[dict, str]]]:
        """`schema` as a union of conjunctions of members free of $ref/allOf/anyOf/oneOf."""
        out: list[list[tuple[dict, str]]] = [[]]
        for member, mpath in self.flatten(schema, path):
            branches = self.branches(member, mpath)
            if branches is None:
                out = [[*conj, (member, mpath)] for conj in out]
                continue
            out = [[*conj, (member, mpath), *b] for conj in out for b in branches]
            if len(out) > _MAX_ALTERNATIVES:
                raise self.error(mpath, "too many anyOf/oneOf combinations")
        return out

    def branches(self, member: dict, path: str) -> list[list[tuple[dict, str]]] | None:
        """The flattened alternatives of a member's `anyOf` and `oneOf` (None if it has neither)."""
        result = None
        for kw in ("anyOf", "oneOf"):
            if kw not in member:
                continue
            subs = member[kw]
            if not isinstance(subs, list) or not subs:
                raise self.error(path, f"'{kw}' must be a non-empty array")
            if kw == "oneOf":
                extra = self.exclusive_restrictions(subs, f"{path}/oneOf")
                subs = [{"allOf": [sub, *more]} if more else sub for sub, more in zip(subs, extra)]
            found = [
                conj
                for i, sub in enumerate(subs)
                for conj in self._sub_alternatives(sub, f"{path}/{kw}/{i}")
            ]
            result = found if result is None else [a + b for a in result for b in found]
        return result

    def _sub_alternatives(self, sub: Any, path: str) -> list[list[tuple[dict, str]]]:
        if sub is False:
            return []
        if sub is True:
            return [[({}, path)]]
        if not isinstance(sub, dict):
            raise self.error(path, "a schema must be an object or a boolean")
        return self.alternatives(sub, path)

    def flatten(self, schema: dict, path: str) -> Iterator[tuple[dict, str]]:
        """`schema` and, recursively, its `$ref` targets and `allOf` members."""
        if "$ref" in schema:
            target, tpath = self.resolve(schema["$ref"], path)
            if self._ref_stack.count(tpath) >= self.opt.max_ref_depth:
                yield {"not": {}}, tpath  # recursion bound: nothing deeper
            elif target is False:
                yield {"not": {}}, tpath
            elif isinstance(target, dict):
                self._ref_stack.append(tpath)
                self._reached |= Counter(self._ref_stack)
                try:
                    yield from self.flatten(target, tpath)
                finally:
                    self._ref_stack.pop()
        for i, sub in enumerate(schema.get("allOf", ())):
            if sub is False:
                yield {"not": {}}, f"{path}/allOf/{i}"
            elif isinstance(sub, dict):
                yield from self.flatten(sub, f"{path}/allOf/{i}")
        yield schema, path
        for implied in self._implied(schema, path):
            yield from self.flatten(implied, path)

    def _implied(self, schema: dict, path: str) -> Iterator[dict]:
        """Keywords rewritten as `anyOf`s: dependencies, `not`, and if/then/else."""
        for kw in ("dependencies", "dependentRequired", "dependentSchemas"):
            deps = schema.get(kw, {})
            if not isinstance(deps, dict):
                raise self.error(path, f"'{kw}' must be an object")
            for key, need in deps.items():
                then = {"required": [key, *need]} if isinstance(need, list) else {
                    "allOf": [{"required": [key]}, need]
                }  # fmt: skip
                yield {"anyOf": [{"properties": {key: False}}, then]}
        if "not" in schema and schema["not"] != {} and not _excluded_values(schema):
            negated = _negate(schema["not"])
            if negated is None:
                raise self.error(path, "'not' is supported only for simple schemas")
            yield negated
        if "if" in schema:
            negated = _negate(schema["if"])
            if negated is None:
                raise self.error(path, "'if' is supported only for simple conditions")
            then, other = schema.get("then", True), schema.get("else", True)
            yield {"anyOf": [{"allOf": [schema["if"], then]}, {"allOf": [negated, other]}]}

    def resolve(self, ref: Any, path: str) -> tuple[Any, str]:
        if not isinstance(ref, str):
            raise self.error(path, "'$ref' must be a string")
        base, _, fragment = ref.partition("#")
        if base and base != self._root_id:
            raise self.error(path, f"remote $ref {ref!r} is not supported (only local references)")
        node: Any = self.root_schema
        if fragment and not fragment.startswith("/"):
            found = _find_anchor(self.root_schema, fragment)
            if found is None:
                raise self.error(path, f"$ref {ref!r}: no such anchor")
            return found, f"#{fragment}"
        for part in fragment.split("/")[1:]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise self.error(path, f"$ref {ref!r} does not resolve")
        return node, "#" + fragment

    # ------------------------------------------------------------------ conjunctions

    def conjunction(self, members: list[tuple[dict, str]], path: str) -> int:
        """Term for values valid against every member (members have no combinators)."""
        for member, mpath in members:
            for kw, why in _UNSUPPORTED.items():
                if kw in member:
                    raise self.error(mpath, f"'{kw}' is not supported: {why}")
        if any(m.get("not") == {} for m, _ in members):
            return EMPTY
        s = self.s
        values = self.finite_values(members)
        if values is not None:
            schema = {"allOf": [m for m, _ in members]}
            return s.alt(*(s.literal(self._dumps(v, schema, path).encode()) for v in values))
        term = s.alt(*(self.typed(t, members, path) for t in self.allowed_types(members)))
        excluded = [v for m, _ in members for v in _excluded_values(m)]
        if excluded:
            term = s.and_(term, s.not_(s.alt(*(s.literal(_dumps(v).encode()) for v in excluded))))
        return term

    def finite_values(self, members: list[tuple[dict, str]]) -> list[Any] | None:
        """The `enum`/`const` values every member accepts, or None if no member lists values."""
        candidates = None
        for member, mpath in members:
            vals = None
            if "const" in member:
                vals = [member["const"]]
            elif "enum" in member:
                if not isinstance(member["enum"], list):
                    raise self.error(mpath, "'enum' must be an array")
                vals = member["enum"]
            if vals is not None and candidates is None:
                candidates = vals
        if candidates is None:
            return None
        # enum/const membership by hashing (jsonschema's own check is linear per value)
        checks = []
        for member, mpath in members:
            rest = {k: x for k, x in member.items() if k not in ("enum", "const")}
            checks.append(self._validator.evolve(schema=rest).is_valid)
            if "const" in member:
                checks.append(_ValueSet([member["const"]]).__contains__)
            if "enum" in member:
                if not isinstance(member["enum"], list):
                    raise self.error(mpath, "'enum' must be an array")
                checks.append(_ValueSet(member["enum"]).__contains__)
        out, seen = [], _ValueSet()
        for v in candidates:
            if time.monotonic() > self.opt.deadline:
                raise ConstraintError("json_schema compilation ran out of time")
            if v not in seen and all(check(v) for check in checks):
                seen.add(v)
                out.append(v)
        return out

    def allowed_types(self, members: list[tuple[dict, str]], *, implied: bool = True) -> list[str]:
        """Types every member admits; with `implied` and no member declaring `type`, a member
        admits only the types its keywords describe (a narrowing used for generation, not for
        reasoning about which values validate)."""
        allowed = set(TYPES)
        implied = implied and not any("type" in m for m, _ in members)
        for member, mpath in members:
            declared = member.get("type")
            if declared is None:
                if not implied:
                    continue
                described = {_KEYWORD_TYPES[k] for k in member if k in _KEYWORD_TYPES}
                if described:
                    allowed &= described | ({"integer"} if "number" in described else set())
                continue
            names = [declared] if isinstance(declared, str) else declared
            if not isinstance(names, list) or any(n not in TYPES for n in names):
                raise self.error(mpath, f"'type' has an unknown type: {declared!r}")
            allowed &= set(names) | ({"integer"} if "number" in names else set())
        if "integer" in allowed and "number" in allowed:
            allowed.discard("integer")  # the number language contains every integer
        return [t for t in TYPES if t in allowed]

    def typed(self, kind: str, members: list[tuple[dict, str]], path: str) -> int:
        s = self.s
        if kind == "null":
            return s.literal(b"null")
        if kind == "boolean":
            return s.alt(s.literal(b"true"), s.literal(b"false"))
        if kind == "string":
            return self.string(members)
        if kind in ("number", "integer"):
            return self.number(members, integer=kind == "integer")
        if kind == "array":
            return self.array(members, path)
        return self.object(members, path)

    # ------------------------------------------------------------------ strings

    def string(self, members: list[tuple[dict, str]]) -> int:
        s = self.s
        lo, hi = 0, None
        parts = []
        for member, mpath in members:
            lo = max(lo, _int_keyword(member, "minLength", mpath, self) or 0)
            mx = _int_keyword(member, "maxLength", mpath, self)
            hi = mx if hi is None else (hi if mx is None else min(hi, mx))
            if "pattern" in member:
                parts.append(self.pattern(member["pattern"], mpath, search=True))
            fmt = member.get("format")
            if isinstance(fmt, str) and (regex := format_regex(fmt)) is not None:
                parts.append(self.pattern(regex, mpath, search=False))
        length = s.repeat(self.json_char, lo, hi)
        content = s.and_(*parts) if parts and lo == 0 and hi is None else s.and_(length, *parts)
        return s.seq(self.quote, content, self.quote)

    def pattern(self, pattern: Any, path: str, *, search: bool) -> int:
        if not isinstance(pattern, str):
            raise self.error(path, "'pattern' must be a string")
        try:
            return regex_term(
                self.s, pattern, flavor="ecma", search=search, encode=cs.json_string_term
            )
        except ConstraintError as e:
            raise self.error(path, f"pattern: {e}") from None

    # ------------------------------------------------------------------ numbers

    def number(self, members: list[tuple[dict, str]], *, integer: bool) -> int:
        lo: Decimal | None = None
        hi: Decimal | None = None
        lo_excl = hi_excl = False
        multiples: list[Decimal] = []
        for member, mpath in members:
            for kw in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
                v = member.get(kw)
                if isinstance(v, bool) or v is None:
                    continue  # draft-4 boolean exclusives are read with their bound below
                if not isinstance(v, (int, float)):
                    raise self.error(mpath, f"'{kw}' must be a number")
                d = Decimal(str(v))
                excl = (
                    kw.startswith("exclusive")
                    or member.get("exclusive" + kw[0].upper() + kw[1:]) is True
                )
                if "inimum" in kw and (lo is None or d > lo or (d == lo and excl)):
                    lo, lo_excl = d, excl
                elif "aximum" in kw and (hi is None or d < hi or (d == hi and excl)):
                    hi, hi_excl = d, excl
            if "multipleOf" in member:
                m = member["multipleOf"]
                if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
                    raise self.error(mpath, "'multipleOf' must be a positive number")
                multiples.append(Decimal(str(m)))
        path = members[-1][1]
        try:
            if integer or any(m == m.to_integral_value() for m in multiples):
                ilo = None if lo is None else _int_bound(lo, lo_excl, up=True)
                ihi = None if hi is None else _int_bound(hi, hi_excl, up=False)
                term = self._regex(integer_range_regex(ilo, ihi))
                return self.s.and_(term, *(self._int_multiple(m, path) for m in multiples))
            regex = number_range_regex(
                None if lo is None else _plain(lo),
                None if hi is None else _plain(hi),
                exclusive_minimum=lo_excl,
                exclusive_maximum=hi_excl,
            )
        except ValueError as e:
            raise self.error(path, f"number bounds: {e}") from None
        return self.s.and_(
            self._regex(regex), *(self._decimal_multiple(m, path) for m in multiples)
        )

    def _int_multiple(self, m: Decimal, path: str) -> int:
        k = int(m)
        if k == 1:
            return self.s.anything
        for digits in (1, 2, 3):
            if 10**digits % k == 0:
                endings = [f"{r:0{digits}d}" for r in range(0, 10**digits, k)]
                short = [str(r) for r in range(0, 10 ** (digits - 1), k)] if digits > 1 else []
                body = "|".join([f"[0-9]*(?:{'|'.join(endings)})", *short])
                return self._regex(f"-?(?:{body})")
        raise self.error(path, f"'multipleOf': {k} (only divisors of 1000 are supported)")

    def _decimal_multiple(self, m: Decimal, path: str) -> int:
        exponent = m.normalize().as_tuple().exponent
        if not isinstance(exponent, int) or m.normalize() != Decimal(1).scaleb(exponent):
            raise self.error(path, f"'multipleOf': {m} (only powers of ten are supported)")
        digits = -exponent
        return self._regex(f"-?(?:0|[1-9][0-9]*)(?:\\.[0-9]{{1,{digits}}}0*)?")

    def _regex(self, regex: str) -> int:
        return regex_term(self.s, regex)

    # ------------------------------------------------------------------ arrays

    def array(self, members: list[tuple[dict, str]], path: str) -> int:
        s = self.s
        lo, hi = 0, None
        prefix: list[list[Any]] = []
        rest: list[Any] = []
        for member, mpath in members:
            lo = max(lo, _int_keyword(member, "minItems", mpath, self) or 0)
            mx = _int_keyword(member, "maxItems", mpath, self)
            hi = mx if hi is None else (hi if mx is None else min(hi, mx))
            items, tail = _item_schemas(member)
            for i, sub in enumerate(items):
                if i == len(prefix):
                    prefix.append(list(rest))  # earlier members' rest schema covers position i
                prefix[i].append(sub)
            for i in range(len(items), len(prefix)):
                prefix[i].append(tail)
            rest.append(tail)
        if hi is not None and hi < lo:
            return EMPTY
        unique = any(m.get("uniqueItems") is True for m, _ in members)
        if unique and (hi is None or hi > 1):
            return self._unique_array(prefix, rest, lo, hi, path)
        item_terms = [self._all_of(subs, f"{path}/items/{i}") for i, subs in enumerate(prefix)]
        rest_term = self._all_of(rest, f"{path}/items")
        body = self._array_body(item_terms, rest_term, lo, hi)
        return s.seq(s.literal(b"["), self.ws, body, self.ws, s.literal(b"]"))

    def _unique_array(
        self, prefix: list[list[Any]], rest: list[Any], lo: int, hi: int | None, path: str
    ) -> int:
        """An array with `uniqueItems`, for items with finitely many values: the items are
        the literals of those values, and no literal may occur twice (JSON values are
        self-delimiting, so a repeated literal is a repeated item)."""
        s = self.s
        domain = None if prefix else self._finite_domain(rest, f"{path}/items")
        if domain is None or len(domain) > _MAX_UNIQUE_VALUES:
            raise self.error(
                path,
                "'uniqueItems' is supported only for items with at most "
                f"{_MAX_UNIQUE_VALUES} possible values (enum, const, boolean, null): an "
                "automaton cannot compare arbitrary items",
            )
        schema = {"allOf": rest}
        literals = [s.literal(self._dumps(v, schema, path).encode()) for v in domain]
        item = s.alt(*literals)
        open_, close = s.seq(s.literal(b"["), self.ws), s.seq(self.ws, s.literal(b"]"))
        array = s.seq(open_, self._array_body([], item, lo, hi), close)
        before = s.star(s.seq(item, self.comma))
        # Past the second copy anything goes, so a state with a repeated item dies at once.
        end = s.seq(self.ws, s.byteset(1 << ord(",") | 1 << ord("]")), s.anything)
        twice = [s.seq(open_, before, v, self.comma, before, v, end) for v in literals]
        return s.and_(array, s.not_(s.alt(*twice)))

    def _finite_domain(self, schemas: list[Any], path: str) -> list[Any] | None:
        """Every value valid against all of `schemas` (the alternatives this translation
        generates) when each alternative lists its values (`enum`, `const`) or admits only
        booleans and null; None otherwise."""
        schemas = [x for x in schemas if x is not True and x != {}]
        if not schemas:
            return None
        out: list[Any] = []
        try:
            conjs = self.alternatives({"allOf": schemas}, path)
        except ConstraintError:  # reported as the uniqueItems refusal
            return None
        for conj in conjs:
            values = self.finite_values(conj)
            if values is None:
                if not set(self.allowed_types(conj, implied=False)) <= {"boolean", "null"}:
                    return None
                values = [
                    v
                    for v in (True, False, None)
                    if all(self._validator.evolve(schema=m).is_valid(v) for m, _ in conj)
                ]
            out.extend(v for v in values if not any(json_equal(v, w) for w in out))
        return out

    def _array_body(self, items: list[int], rest: int, lo: int, hi: int | None) -> int:
        s = self.s
        n = len(items)
        if hi is not None:
            items = items[:hi]
        # tail(i): elements from position i on, i > 0 (each preceded by a comma)
        if hi is not None and hi <= len(items):
            tail = EPS
        else:
            more_lo = max(lo - len(items), 0)
            more_hi = None if hi is None else hi - len(items)
            if n == 0:
                first = s.seq(rest, s.repeat(s.seq(self.comma, rest), max(more_lo - 1, 0),
                                             None if more_hi is None else more_hi - 1))  # fmt: skip
                return s.alt(first, EPS) if more_lo == 0 else first
            tail = s.repeat(s.seq(self.comma, rest), more_lo, more_hi)
        for i in range(len(items) - 1, -1, -1):
            sep = EPS if i == 0 else self.comma
            tail = s.seq(sep, items[i], tail)
            if i >= lo:
                tail = s.alt(tail, EPS)
        return tail

    def _all_of(self, schemas: list[Any], path: str) -> int:
        schemas = [x for x in schemas if x is not True and x != {}]
        if not schemas:
            return self.any_value(self.opt.any_value_depth)
        if len(schemas) == 1:
            return self.value(schemas[0], path)
        if any(x is False for x in schemas):
            return EMPTY
        return self.value({"allOf": schemas}, path)

    # ------------------------------------------------------------------ objects

    def merge_objects(self, members: list[tuple[dict, str]]) -> tuple[_Object, list, list]:
        """Declared keys with their schemas, and the members' rules for undeclared keys."""
        obj = _Object()
        for member, mpath in members:
            props = member.get("properties", {})
            if not isinstance(props, dict):
                raise self.error(mpath, "'properties' must be an object")
            for key, _sub in props.items():
                obj.declared.setdefault(key, [])
            req = member.get("required", [])
            if not isinstance(req, list):
                req = []  # draft-3 boolean 'required' on a property: annotation here
            for key in req:
                if isinstance(key, str) and key not in obj.required:
                    obj.required.append(key)
        for key in obj.required:
            obj.declared.setdefault(key, [])
        extra_rules = []  # per member: (patterns [(regex, schema)], additional schema)
        names = []
        for member, mpath in members:
            props = member.get("properties", {})
            patterns = member.get("patternProperties", {})
            additional = member.get("additionalProperties", True)
            if not isinstance(patterns, dict):
                raise self.error(mpath, "'patternProperties' must be an object")
            for key, schemas in obj.declared.items():
                if key in props:
                    schemas.append(props[key])
                    continue
                matched = [sub for p, sub in patterns.items() if self._matches(p, key, mpath)]
                if matched:
                    schemas.extend(matched)
                elif additional is False:
                    obj.forbidden.add(key)
                elif additional is not True:
                    schemas.append(additional)
            if patterns or additional is not True:
                extra_rules.append((mpath, list(patterns.items()), additional))
            if "propertyNames" in member:
                names.append((member["propertyNames"], mpath))
        for schema, _ in names:
            for key in list(obj.declared):
                if not self._validator.evolve(schema=schema).is_valid(key):
                    obj.forbidden.add(key)
        return obj, extra_rules, names

    def _matches(self, pattern: str, key: str, path: str) -> bool:
        try:
            return re.search(pattern, key) is not None
        except re.error as e:
            raise self.error(path, f"patternProperties: invalid regex {pattern!r}: {e}") from None

    def object(self, members: list[tuple[dict, str]], path: str) -> int:
        s = self.s
        obj, extra_rules, names = self.merge_objects(members)
        pairs = []  # (term of '"key":value', required)
        for key, schemas in obj.declared.items():
            required = key in obj.required
            value = (
                EMPTY if key in obj.forbidden else self._all_of(schemas, f"{path}/properties/{key}")
            )
            if value == EMPTY:
                if required:
                    return EMPTY
                continue
            pairs.append((s.seq(s.literal(_dumps(key).encode()), self.colon, value), required))
        extra = self.extra_members(obj, extra_rules, names, path)
        lo, hi = self._property_bounds(members)
        if lo <= len(obj.required):
            lo = 0  # the required keys are always there
        try:
            body = members_term(s, pairs, extra, self.comma, lo, hi)
        except ConstraintError as e:
            raise self.error(path, f"'minProperties'/'maxProperties': {e}") from None
        return s.seq(s.literal(b"{"), self.ws, body, self.ws, s.literal(b"}"))

    def extra_members(self, obj: _Object, rules: list, names: list, path: str) -> int:
        """Term for one undeclared '"key":value' pair (EMPTY when none is allowed)."""
        s = self.s
        declared = [s.literal(_dumps(k).encode()) for k in obj.declared]
        key_base = (
            s.and_(self.any_string(), s.not_(s.alt(*declared))) if declared else self.any_string()
        )
        for schema, mpath in names:
            key_base = s.and_(key_base, self.value(schema, f"{mpath}/propertyNames"))
        if not rules:
            if obj.declared and not self.opt.extra_properties:
                return EMPTY
            return s.seq(key_base, self.colon, self.any_value(self.opt.any_value_depth - 1))
        with_patterns = [r for r in rules if r[1]]
        if len(with_patterns) > 1:
            raise self.error(path, "patternProperties in several allOf members are not supported")
        others = [additional for _, patterns, additional in rules if not patterns]
        if any(a is False for a in others):
            return EMPTY
        if not with_patterns:
            value = self._all_of(others, f"{path}/additionalProperties")
            return s.seq(key_base, self.colon, value) if value != EMPTY else EMPTY
        mpath, patterns, additional = with_patterns[0]
        langs = [self._key_pattern(p, mpath) for p, _ in patterns]
        n = len(patterns)
        if n <= _MAX_PATTERN_REGIONS:  # every combination of matched patterns
            regions = [[i for i in range(n) if subset >> i & 1] for subset in range(1 << n)]
        else:  # keys matching exactly one pattern, or none (keys matching several are left out)
            regions = [[], *([i] for i in range(n))]
        out = []
        for inside in regions:
            key = s.and_(
                key_base,
                *(langs[i] if i in inside else s.not_(langs[i]) for i in range(len(patterns))),
            )
            schemas = [patterns[i][1] for i in inside] if inside else [additional]
            if not inside and additional is False:
                continue
            value = self._all_of(schemas + others, f"{mpath}/patternProperties")
            if value != EMPTY and not s.is_empty(key):
                out.append(s.seq(key, self.colon, value))
        return s.alt(*out)

    def _key_pattern(self, pattern: str, path: str) -> int:
        return self.s.seq(self.quote, self.pattern(pattern, path, search=True), self.quote)

    def _property_bounds(self, members: list[tuple[dict, str]]) -> tuple[int, int | None]:
        """The tightest `minProperties` and `maxProperties` (None: unbounded) of `members`."""
        lo, hi = 0, None
        for member, mpath in members:
            lo = max(lo, _int_keyword(member, "minProperties", mpath, self) or 0)
            mx = _int_keyword(member, "maxProperties", mpath, self)
            hi = mx if hi is None else (hi if mx is None else min(hi, mx))
        return lo, hi

    # ------------------------------------------------------------------ free-form values

    def any_string(self) -> int:
        return self.s.seq(self.quote, self.s.star(self.json_char), self.quote)

    def any_value(self, depth: int) -> int:
        """Any JSON value nested at most `depth` containers deep."""
        term = self._any.get(depth)
        if term is not None:
            return term
        s = self.s
        if depth <= 0:
            term = self._any[depth] = s.alt(
                self.any_string(),
                self._regex(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"),
                s.literal(b"true"),
                s.literal(b"false"),
                s.literal(b"null"),
            )
            return term
        inner = self.any_value(depth - 1)
        items = s.seq(inner, s.star(s.seq(self.comma, inner)))
        pair = s.seq(self.any_string(), self.colon, inner)
        pairs = s.seq(pair, s.star(s.seq(self.comma, pair)))
        array = s.seq(s.literal(b"["), self.ws, s.optional(items), self.ws, s.literal(b"]"))
        obj = s.seq(s.literal(b"{"), self.ws, s.optional(pairs), self.ws, s.literal(b"}"))
        term = self._any[depth] = s.alt(self.any_value(0), array, obj)
        return term

    # ------------------------------------------------------------------ oneOf

    def exclusive_restrictions(self, subs: list[Any], path: str) -> list[list[dict]]:
        """Per `oneOf` branch, extra schemas that make the branches mutually exclusive.

        Two branches need nothing when they provably share no value. Otherwise a branch is
        narrowed by a sufficient condition for failing the other one (which only drops valid
        values, never admits invalid ones): a key on which both branches hold disjoint
        constants must be present, a key the other branch requires must be missing, or a
        key the other (closed) branch does not declare must be present.
        """
        infos = [self._branch_info(sub, f"{path}/{i}") for i, sub in enumerate(subs)]
        extra: list[list[dict]] = [[] for _ in subs]
        for i in range(len(subs)):
            for j in range(len(subs)):
                if i == j or disjoint(infos[i], infos[j]):
                    continue
                if infos[i].values is not None:  # keep the values that fail branch j
                    check = self._validator.evolve(schema=subs[j])
                    extra[i].append({"enum": [v for v in infos[i].values if not check.is_valid(v)]})
                    continue
                restriction = separator(infos[i], infos[j])
                if restriction is None:
                    raise self.error(
                        path,
                        f"'oneOf' branches {i} and {j} may both match a value, so exactly-one "
                        "cannot be enforced (use anyOf if overlap is acceptable)",
                    )
                extra[i].append(restriction)
        return extra

    def _branch_info(self, sub: Any, path: str, depth: int = 2) -> Summary:
        """A `Summary` of the values `sub` accepts: its members' facts, met with the union
        of each `anyOf`/`oneOf`; properties and items are summarized `depth` levels down.
        Cached per subschema; a subschema met again inside itself is summarized as ANY."""
        if not isinstance(sub, dict):
            return ANY if sub is True else Summary(set())
        key = (id(sub), depth)
        hit = self._summaries.get(key)
        if hit is not None:
            return hit[1]
        self._summaries[key] = (sub, ANY)  # while in progress
        try:
            members = [m for m, _ in self.flatten(sub, path)]
        except ConstraintError:  # reported where the branch itself is translated
            return ANY
        summary = self._conj_info(members, path, depth)
        for m in members:
            for kw in ("anyOf", "oneOf"):
                if isinstance(m.get(kw), list):
                    alts = [self._branch_info(x, f"{path}/{kw}", depth) for x in m[kw]]
                    summary = meet(summary, union(alts))
        self._summaries[key] = (sub, summary)
        return summary

    def _conj_info(self, members: list[dict], path: str, depth: int) -> Summary:
        """`_branch_info` of one conjunction of members free of combinators."""
        pairs = [(m, path) for m in members]
        values = self.finite_values(pairs)
        types = set(self.allowed_types(pairs, implied=False))
        if values is not None:
            found = {json_type(v) for v in values}
            types &= found | ({"number", "integer"} if found & {"number", "integer"} else set())
        if "number" in types:
            types.add("integer")
        if values is None and types <= {"string"}:
            literals = [_literal_pattern(m.get("pattern")) for m in members]
            values = next(([v, v + "\n"] for v in literals if v is not None), None)
        out = Summary(types, values)
        declared: dict[str, list[Any]] = {}
        for m in members:
            for k, prop in m.get("properties", {}).items():
                declared.setdefault(k, []).append(prop)
        for k, props in declared.items() if depth > 0 else ():
            sub = props[0] if len(props) == 1 else {"allOf": props}
            out.props[k] = self._branch_info(sub, f"{path}/properties/{k}", depth - 1)
        for m in members:
            out.required |= {k for k in m.get("required", []) if isinstance(k, str)}
            if m.get("additionalProperties") is False and not m.get("patternProperties"):
                keys = set(m.get("properties", {}))
                out.closed = keys if out.closed is None else out.closed & keys
            mx = m.get("maxProperties")
            if isinstance(mx, int) and not isinstance(mx, bool):
                out.max_props = mx if out.max_props is None else min(out.max_props, mx)
            mn = m.get("minItems")
            if isinstance(mn, int) and not isinstance(mn, bool):
                out.min_items = max(out.min_items, mn)
            additional = m.get("additionalProperties")
            if depth > 0 and isinstance(additional, dict) and not m.get("patternProperties"):
                out.extra = self._branch_info(additional, f"{path}/additionalProperties", depth - 1)
            items = m.get("items")
            if depth > 0 and isinstance(items, (dict, bool)) and "prefixItems" not in m:
                out.items = self._branch_info(items, f"{path}/items", depth - 1)
        return out

    # ------------------------------------------------------------------ canonical form

    def _dumps(self, value: Any, schema: Any, path: str) -> str:
        if isinstance(value, list):
            items = [
                self._dumps(v, self._item_schema(schema, i, path), path)
                for i, v in enumerate(value)
            ]
            return "[" + ",".join(items) + "]"
        if not isinstance(value, dict) or not isinstance(schema, dict):
            return _dumps(value)
        try:
            members = self._matching_members(value, schema, path)
            obj, _, _ = self.merge_objects(members)
        except ConstraintError:  # a schema we cannot compile: keep the instance's key order
            return _dumps(value)
        order = [k for k in obj.declared if k in value] + [
            k for k in value if k not in obj.declared
        ]
        parts = []
        for key in order:
            sub = self._property_schema(members, key)
            parts.append(_dumps(key) + ":" + self._dumps(value[key], sub, path))
        return "{" + ",".join(parts) + "}"

    def _matching_members(self, value: Any, schema: dict, path: str) -> list[tuple[dict, str]]:
        for conj in self.alternatives(schema, path):
            if all(self._validator.evolve(schema=m).is_valid(value) for m, _ in conj):
                return conj
        return list(self.flatten(schema, path))

    def _property_schema(self, members: list[tuple[dict, str]], key: str) -> dict:
        schemas = []
        for member, _ in members:
            if key in member.get("properties", {}):
                schemas.append(member["properties"][key])
                continue
            matched = [
                sub for p, sub in member.get("patternProperties", {}).items() if re.search(p, key)
            ]
            extra = member.get("additionalProperties", True)
            schemas.extend(matched or ([extra] if isinstance(extra, dict) else []))
        return {"allOf": schemas}

    def _item_schema(self, schema: Any, index: int, path: str) -> Any:
        if not isinstance(schema, dict):
            return True
        schemas = []
        for member, _ in self.flatten(schema, path):
            items, tail = _item_schemas(member)
            schemas.append(items[index] if index < len(items) else tail)
        return {"allOf": schemas}

    def error(self, path: str, message: str) -> ConstraintError:
        return ConstraintError(f"json_schema at {path}: {message}")


_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "deprecated"}


def _negate(schema: Any) -> dict | None:
    """A schema accepting exactly the values `schema` rejects, for the forms we can express
    exactly; None otherwise."""
    if schema is True or schema == {}:
        return {"not": {}}
    if schema is False:
        return {}
    if not isinstance(schema, dict):
        return None
    keys = set(schema) - _ANNOTATIONS
    if keys == {"enum"} or keys == {"const"}:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if isinstance(values, list) and all(isinstance(v, SCALARS) for v in values):
            return {"not": {"enum": values}}  # excluded literals, see _excluded_values
        return None
    if keys == {"type"}:
        named = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not isinstance(named, list) or ("integer" in named and "number" not in named):
            return None
        return {"type": [t for t in TYPES if t not in named and t != "integer"]}
    if keys == {"required"} and isinstance(schema["required"], list):
        return {"type": "object", "anyOf": [{"properties": {k: False}} for k in schema["required"]]}
    if keys in ({"properties"}, {"properties", "required"}, {"properties", "type"},
                {"properties", "required", "type"}):  # fmt: skip
        if schema.get("type", "object") != "object":
            return None
        props = schema["properties"]
        required = schema.get("required", [])
        if not isinstance(props, dict) or len(props) != 1 or set(required) - set(props):
            return None
        ((key, sub),) = props.items()
        inner = _negate(sub)
        if inner is None:
            return None
        fails = {"type": "object", "required": [key], "properties": {key: inner}}
        if key in required:
            return {"anyOf": [{"type": "object", "properties": {key: False}}, fails]}
        return fails
    if keys == {"anyOf"} and isinstance(schema["anyOf"], list):
        parts = [_negate(sub) for sub in schema["anyOf"]]
        return None if any(p is None for p in parts) else {"allOf": parts}
    return None


def _excluded_values(member: dict) -> list[Any]:
    """Scalar values a member's `not: {enum}` forbids (written by `_negate`)."""
    neg = member.get("not")
    values = neg.get("enum") if isinstance(neg, dict) and set(neg) == {"enum"} else None
    if isinstance(values, list) and all(isinstance(v, SCALARS) for v in values):
        return values
    return []


def _item_schemas(member: dict) -> tuple[list[Any], Any]:
    """A member's per-position item schemas and the schema of the items after them."""
    if "prefixItems" in member:
        return list(member["prefixItems"]), member.get("items", True)
    items = member.get("items", True)
    if isinstance(items, list):
        return list(items), member.get("additionalItems", True)
    return [], items


def _int_keyword(member: dict, kw: str, path: str, tr: _Translator) -> int | None:
    v = member.get(kw)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise tr.error(path, f"'{kw}' must be a non-negative integer")
    return int(v)


def _int_bound(d: Decimal, exclusive: bool, *, up: bool) -> int:
    if up:
        n = math.ceil(d)
        return n + 1 if exclusive and n == d else n
    n = math.floor(d)
    return n - 1 if exclusive and n == d else n


def _plain(d: Decimal) -> int | float:
    return int(d) if d == d.to_integral_value() else float(d)


def _find_anchor(node: Any, name: str) -> Any:
    if isinstance(node, dict):
        if (
            node.get("$anchor") == name
            or node.get("$id") == "#" + name
            or node.get("id") == "#" + name
        ):
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_anchor(child, name)
        if found is not None:
            return found
    return None


def _sample_bytes(store: TermStore, term: int, limit: int = 64) -> set[int]:
    """Bytes that can occur in strings of `term` (explores at most `limit` states)."""
    seen = {term}
    frontier = [term]
    out: set[int] = set()
    while frontier and len(seen) < limit:
        t = frontier.pop()
        for mask, nxt in store.row(t):
            if nxt == EMPTY:
                continue
            out |= {b for b in range(256) if mask >> b & 1}
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return out


_LITERAL_PATTERN = re.compile(r"\^([A-Za-z0-9_ -]*)\$")


def _literal_pattern(pattern: Any) -> str | None:
    """The string an anchored literal `pattern` like `^abc$` spells (Python's `$` also
    admits one trailing newline), or None."""
    m = _LITERAL_PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    return m.group(1) if m else None
