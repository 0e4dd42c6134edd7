"""Property tests for fsm.numeric and fsm.formats against Python reference parsers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
import string
import urllib.parse
import uuid
from collections.abc import Callable
from decimal import Decimal

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm.formats import format_regex
from fsm.numeric import integer_range_regex, number_range_regex

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)
FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def full(regex: str, text: str) -> bool:
    return re.fullmatch(regex, text, re.ASCII) is not None


# --------------------------------------------------------------------------- integers

INTEGER_TEXT = st.text("0123456789-+", max_size=6)


def bound_integers() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-1200, 1200),
        st.integers(-(10**25), 10**25),
        st.sampled_from([0, -1, 1, 9, 10, 99, 100, -10, 10**6, -(10**6) + 1]),
    )


@pytest.mark.parametrize(
    ("low", "high"),
    [(None, None), (0, None), (None, 0), (-5, 17), (0, 0), (7, 7), (-100, -3), (123, 4567)],
)
def test_integer_range_exhaustive(low: int | None, high: int | None) -> None:
    regex = integer_range_regex(low, high)
    for value in range(-5000, 5001):
        expected = (low is None or low <= value) and (high is None or value <= high)
        assert full(regex, str(value)) == expected, (regex, value)


@SETTINGS
@given(
    low=st.none() | bound_integers(),
    high=st.none() | bound_integers(),
    offsets=st.lists(st.integers(-30, 30), max_size=20),
    texts=st.lists(INTEGER_TEXT, max_size=20),
)
def test_integer_range_random(
    low: int | None, high: int | None, offsets: list[int], texts: list[str]
) -> None:
    if low is not None and high is not None and low > high:
        with pytest.raises(ValueError, match="empty"):
            integer_range_regex(low, high)
        return
    regex = integer_range_regex(low, high)
    anchors = [b for b in (low, high, 0) if b is not None]
    candidates = [str(a + o) for a in anchors for o in offsets] + texts
    for text in candidates:
        canonical = re.fullmatch("-?[0-9]+", text) is not None and str(int(text)) == text
        inside = (
            canonical and (low is None or low <= int(text)) and (high is None or int(text) <= high)
        )
        assert full(regex, text) == inside, (low, high, text)


def test_integer_range_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="empty"):
        integer_range_regex(3, 2)
    with pytest.raises(TypeError):
        integer_range_regex(1.5, None)  # type: ignore[arg-type]


def test_integer_range_is_compact() -> None:
    assert len(integer_range_regex(-(10**40) + 7, 10**40 - 3)) < 2000


# --------------------------------------------------------------------------- numbers

FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
NUMBER_TEXT = st.text("0123456789.-+eE", max_size=9)
JSON_NUMBER_TEXT = st.from_regex(JSON_NUMBER, fullmatch=True)
HUGE_EXPONENT = re.compile("[eE][+-]?0*[1-9][0-9]{15}")
NORMALIZED_EXPONENT = re.compile(r"-?[1-9](?:\.[0-9]+)?[eE][+-]?[0-9]+")


def bound_numbers() -> st.SearchStrategy[float]:
    return st.one_of(
        st.integers(-1000, 1000),
        st.integers(-(10**20), 10**20),
        FINITE_FLOATS,
        st.floats(-100, 100).map(lambda x: round(x, 3)),
        st.sampled_from([0, 0.5, -1.25, 1e-05, 1.5e16, -0.0, 1e300, 5e-324, 0.1]),
    )


def in_range(
    value: Decimal,
    low: float | None,
    high: float | None,
    exclusive_low: bool,
    exclusive_high: bool,
) -> bool:
    """Whether value lies within the bounds, each compared as Decimal(str(bound))."""
    if low is not None:
        bound = Decimal(str(low))
        if value < bound or (exclusive_low and value == bound):
            return False
    if high is not None:
        bound = Decimal(str(high))
        if value > bound or (exclusive_high and value == bound):
            return False
    return True


def neighbours(bound: float) -> list[float]:
    """Numbers at and around a bound, of both types and several magnitudes."""
    base = [bound, bound * 1.0000001, bound / 1.0000001, bound + 1, bound - 1, -bound]
    base += [bound + 0.5, bound - 0.5, bound * 10, bound / 10, round(bound, 2)]
    base += [math.nextafter(bound, math.inf), math.nextafter(bound, -math.inf)]
    return [x for x in base if math.isfinite(x)]


def bound_texts(bound: float) -> list[str]:
    """Plain and scientific spellings of a bound, each with single-digit edits and extensions."""
    value = Decimal(str(bound))
    spellings = [
        format(value, "f"),
        format(value, "e"),
        format(value, ".3e"),
        format(value, ".20f"),
    ]
    texts = []
    for text in spellings:
        texts += [text, text + "0", text + "1", text + "9", text[:-1]]
        for i, char in enumerate(text):
            if char.isdigit():
                for digit in {str(int(char) - 1), str(int(char) + 1)} - {"-1", "10"}:
                    texts.append(text[:i] + digit + text[i + 1 :])
    return texts


@SETTINGS
@given(
    low=st.none() | bound_numbers(),
    high=st.none() | bound_numbers(),
    exclusive_low=st.booleans(),
    exclusive_high=st.booleans(),
    numbers=st.lists(st.integers() | FINITE_FLOATS, max_size=15),
    texts=st.lists(NUMBER_TEXT | JSON_NUMBER_TEXT, max_size=30),
)
def test_number_range_random(
    low: float | None,
    high: float | None,
    exclusive_low: bool,
    exclusive_high: bool,
    numbers: list[float],
    texts: list[str],
) -> None:
    bounds = (low, high, exclusive_low, exclusive_high)
    try:
        regex = number_range_regex(
            low, high, exclusive_minimum=exclusive_low, exclusive_maximum=exclusive_high
        )
    except ValueError:
        lo, hi = Decimal(str(low)), Decimal(str(high))
        assert lo > hi or (lo == hi and (exclusive_low or exclusive_high))
        return
    anchors = [b for b in (low, high, 0, 1, -1) if b is not None]
    candidates = [x for a in anchors for x in neighbours(a)] + numbers
    for number in candidates:
        text = json.dumps(number)
        # Every json.dumps output of an in-range int/float is accepted, nothing else is.
        assert full(regex, text) == in_range(Decimal(text), *bounds), (bounds, text)
    texts += [text for b in anchors for text in bound_texts(b)]
    for text in texts + [t.upper() for t in texts]:
        if HUGE_EXPONENT.search(text):
            continue  # beyond what Decimal can represent
        inside = JSON_NUMBER.fullmatch(text) is not None and in_range(Decimal(text), *bounds)
        matched = full(regex, text)
        assert not matched or inside, (bounds, text)
        if inside and ("e" not in text.lower() or NORMALIZED_EXPONENT.fullmatch(text)):
            assert matched, (bounds, text)


@pytest.mark.parametrize(
    ("kwargs", "accepted", "rejected"),
    [
        ({"minimum": 0}, ["0", "-0.0", "12.5e3", "0.05E-2", "1e-05", "0e9"], ["-1e-05", "-1"]),
        ({"minimum": 0, "exclusive_minimum": True}, ["1e-05", "12.5e3"], ["0", "-0", "0e1"]),
        ({"maximum": 0}, ["-0", "-12.5e3", "-0.05E+2", "0"], ["1e-05", "0.1"]),
        ({"maximum": 0.5}, ["0.5", "0.50", "5e-1", "-3.5e300", "0.4999"], ["0.5001", "5.1e-1"]),
        ({"minimum": -1.25, "maximum": 100}, ["-1.25", "-1.2e0", "1E2", "99.99"], ["-1.26"]),
        ({"minimum": 1, "maximum": 10}, ["1", "1.0", "10", "1e1", "1.00E+001"], ["10.01"]),
    ],
)
def test_number_range_examples(kwargs: dict, accepted: list[str], rejected: list[str]) -> None:
    low, high = kwargs.pop("minimum", None), kwargs.pop("maximum", None)
    regex = number_range_regex(low, high, **kwargs)
    assert [text for text in accepted if not full(regex, text)] == []
    assert [text for text in rejected if full(regex, text)] == []


def test_number_range_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="empty"):
        number_range_regex(1, 1, exclusive_maximum=True)
    with pytest.raises(ValueError, match="empty"):
        number_range_regex(2.5, 2)
    with pytest.raises(ValueError, match="finite"):
        number_range_regex(None, float("inf"))


# --------------------------------------------------------------------------- formats

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
URI_CHARS = set(PATH_CHARS + "/?#[]%")
RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)
ISO_DURATION = re.compile(
    r"P(?:[0-9]+W|(?=[0-9T])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?"
    r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+S)?)?)"
)
LABEL = re.compile("[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_date(text: str) -> bool:
    if not re.fullmatch("[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def is_date_time(text: str) -> bool:
    """RFC 3339 section 5.6 date-time (leap seconds allowed, as the RFC does)."""
    match = RFC3339.fullmatch(text)
    if not match:
        return False
    year, month, day, hour, minute, second, offset_hour, offset_minute = match.groups()
    return (
        is_date(f"{year}-{month}-{day}")
        and int(hour) <= 23
        and int(minute) <= 59
        and int(second) <= 60
        and int(offset_hour or 0) <= 23
        and int(offset_minute or 0) <= 59
    )


def is_hostname(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and all(LABEL.fullmatch(label) for label in labels)


def is_email(text: str) -> bool:
    local, _, domain = text.rpartition("@")
    atoms = local.split(".")
    return all(atom and set(atom) <= set(ATEXT) for atom in atoms) and is_hostname(domain)


def is_ip(version: int, text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == version


def is_uri_reference(text: str) -> bool:
    """Necessary conditions from RFC 3986: its alphabet, %XX escapes, one '#', brackets only
    around an IPv6 (or IPvFuture) host."""
    if not set(text) <= URI_CHARS or re.search("%(?![0-9A-Fa-f]{2})", text):
        return False
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return False
    rest = parts.path + parts.query + parts.fragment
    if text.count("#") > 1 or "[" in rest or "]" in rest:
        return False
    host = parts.netloc.rpartition("@")[2]
    if "[" in host:
        literal = host[host.index("[") + 1 : host.index("]")]
        return literal.startswith("v") or is_ip(6, literal)
    return True


def is_uri(text: str) -> bool:
    return is_uri_reference(text) and re.match("[A-Za-z][A-Za-z0-9+.-]*:", text) is not None


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36 and all(text[i] == "-" for i in (8, 13, 18, 23))


REFERENCES: dict[str, Callable[[str], bool]] = {
    "date": is_date,
    "time": lambda text: is_date_time("1970-01-01T" + text),
    "date-time": is_date_time,
    "duration": lambda text: ISO_DURATION.fullmatch(text) is not None,
    "email": is_email,
    "idn-email": is_email,
    "hostname": is_hostname,
    "ipv4": lambda text: is_ip(4, text),
    "ipv6": lambda text: is_ip(6, text),
    "uri": is_uri,
    "uri-reference": is_uri_reference,
    "iri": is_uri,
    "iri-reference": is_uri_reference,
    "uuid": is_uuid,
    "json-pointer": lambda text: (
        text == "" or (text[0] == "/" and not re.search("~[^01]|~$", text))
    ),
}


def valid_for(name: str, text: str) -> bool:
    return REFERENCES[name](text) and FORMAT_CHECKER.conforms(text, name)


def joined(*parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(*parts).map("".join)


def optional(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.just("") | strategy


FRACTION = optional(st.from_regex(r"\.[0-9]{1,6}", fullmatch=True))
OFFSET = st.just("Z") | st.from_regex("[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]", fullmatch=True)
TIMES = joined(st.times().map(lambda t: t.strftime("%H:%M:%S")), FRACTION, OFFSET)
DATES = st.dates().map(datetime.date.isoformat)
NUMBER = st.integers(0, 10**6).map(str)
DURATION_TIME = joined(
    st.just("T"),
    st.sampled_from(["H", "HM", "HMS", "M", "MS", "S"]).flatmap(
        lambda units: joined(*(joined(NUMBER, st.just(unit)) for unit in units))
    ),
)
DURATIONS = (
    joined(
        st.just("P"),
        st.sampled_from(["D", "M", "MD", "Y", "YM", "YMD"]).flatmap(
            lambda units: joined(*(joined(NUMBER, st.just(unit)) for unit in units))
        ),
        optional(DURATION_TIME),
    )
    | joined(st.just("P"), DURATION_TIME)
    | joined(st.just("P"), NUMBER, st.just("W"))
)
LABELS = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
HOSTNAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join) | joined(
    st.from_regex(r"[a-z0-9][a-z0-9-]{61}[a-z0-9]", fullmatch=True), st.just(".example.com")
)
EMAILS = joined(
    st.lists(st.text(ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join),
    st.just("@"),
    HOSTNAMES,
)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).flatmap(
    lambda a: st.sampled_from([str(a), a.exploded, str(a).upper()])
) | joined(st.sampled_from(["::ffff:", "64:ff9b::", "::", "1:2:3:4:5:6:"]), IPV4)
PCT = st.from_regex("%[0-9A-Fa-f]{2}", fullmatch=True)
SEGMENT = st.lists(st.sampled_from(PATH_CHARS) | PCT, max_size=6).map("".join)
PATH = st.lists(SEGMENT, max_size=3).map(lambda segments: "".join("/" + s for s in segments))
QUERY = optional(joined(st.just("?"), SEGMENT, st.just("/?"), SEGMENT))
FRAGMENT = optional(joined(st.just("#"), SEGMENT, st.just("?"), SEGMENT))
HOSTS = HOSTNAMES | IPV4 | IPV6.map(lambda a: f"[{a}]")
AUTHORITY = joined(
    optional(joined(SEGMENT.map(lambda s: s.replace("@", "")), st.just("@"))),
    HOSTS,
    optional(joined(st.just(":"), NUMBER)),
)
SCHEMES = st.from_regex(r"[A-Za-z][A-Za-z0-9+.\-]{0,6}", fullmatch=True)
URIS = joined(SCHEMES, st.just("://"), AUTHORITY, PATH, QUERY, FRAGMENT) | joined(
    SCHEMES, st.just(":"), SEGMENT.filter(lambda s: s[:1] not in ("", "/")), PATH, QUERY
)
RELATIVE_REFS = (
    joined(st.just("//"), AUTHORITY, PATH, QUERY, FRAGMENT)
    | joined(PATH.filter(lambda p: not p.startswith("//")), QUERY, FRAGMENT)
    | joined(SEGMENT.map(lambda s: s.replace(":", "")).filter(bool), PATH, QUERY, FRAGMENT)
)
POINTERS = st.lists(st.text(max_size=5), max_size=4).map(
    lambda parts: "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)
)

# name -> (valid values, alphabet for near misses)
CASES: dict[str, tuple[st.SearchStrategy[str], str]] = {
    "date": (DATES, "0123456789-"),
    "time": (TIMES, "0123456789:.+-Z"),
    "date-time": (joined(DATES, st.just("T"), TIMES), "0123456789:.+-TZ"),
    "duration": (DURATIONS, "0123456789PYMWDTHS"),
    "email": (EMAILS, "ab9.-@_+"),
    "idn-email": (EMAILS, "ab9.-@_+"),
    "hostname": (HOSTNAMES, "ab9.-_"),
    "ipv4": (IPV4, "0123456789."),
    "ipv6": (IPV6, "0123456789abcdefABCDEF:.%"),
    "uri": (URIS, "ab9:/?#[]@%.-"),
    "uri-reference": (URIS | RELATIVE_REFS, "ab9:/?#[]@%.-"),
    "iri": (URIS, "ab9:/?#[]@%.-é"),
    "iri-reference": (URIS | RELATIVE_REFS, "ab9:/?#[]@%.-é"),
    "uuid": (st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()), "0123456789abcdefg-"),
    "json-pointer": (POINTERS, "/~01a"),
}


@st.composite
def near_misses(draw: st.DrawFn, values: st.SearchStrategy[str], alphabet: str) -> str:
    """A valid value with one character inserted, replaced or deleted."""
    text = draw(values)
    index = draw(st.integers(0, len(text)))
    char = draw(st.sampled_from(alphabet))
    edit = draw(st.sampled_from(["insert", "replace", "delete"]))
    if edit == "insert":
        return text[:index] + char + text[index:]
    return text[:index] + (char if edit == "replace" else "") + text[index + 1 :]


def test_formats_are_all_tested() -> None:
    assert set(CASES) == set(REFERENCES)
    assert all(format_regex(name) is not None for name in CASES)
    assert format_regex("regex") is None
    assert format_regex("no-such-format") is None


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_format_sound_and_complete(name: str, data: st.DataObject) -> None:
    regex = format_regex(name)
    assert regex is not None
    values, alphabet = CASES[name]
    for text in data.draw(st.lists(values, min_size=1, max_size=8), label="valid"):
        assert valid_for(name, text), text
        assert full(regex, text), text
    misses = st.lists(near_misses(values, alphabet) | st.text(alphabet, max_size=24), max_size=16)
    for text in data.draw(misses, label="near misses"):
        assert not full(regex, text) or valid_for(name, text), text


@pytest.mark.parametrize(
    ("name", "accepted", "rejected"),
    [
        ("date", ["2024-02-29", "2000-02-29", "0001-01-01"], ["1900-02-29", "2023-04-31"]),
        ("date", ["9999-12-31"], ["0000-01-01", "2024-1-01", "2024-13-01"]),
        ("date-time", ["2024-01-31T12:00:00Z", "2024-01-31T12:00:00.123+02:00"], []),
        ("date-time", [], ["2024-01-31 12:00:00Z", "2024-01-31T12:00:00", "2024-01-31T24:00:00Z"]),
        ("time", ["23:59:59Z", "00:00:00.5-11:30"], ["12:00:00", "12:60:00Z", "1:00:00Z"]),
        ("duration", ["P1Y2M3DT4H5M6S", "PT0S", "P3W", "P1D"], ["P", "PT", "P1H", "P1Y1D"]),
        ("email", ["john.doe@example.com", "a+b@x.co.uk"], ["john@", "@x.com", "a..b@x.com"]),
        ("hostname", ["example.com", "localhost", "a-b.c"], ["-a.com", "a_b.com", "a.", ""]),
        ("ipv4", ["192.168.0.1", "0.0.0.0"], ["01.2.3.4", "256.1.1.1", "1.2.3"]),
        ("ipv6", ["::1", "::", "fe80::1:2", "::ffff:1.2.3.4"], ["1::2::3", "1:2:3:4:5:6:7:8:9"]),
        ("uri", ["https://example.com/a?b=c#d", "urn:isbn:0451450523"], ["/a/b", "http://a b"]),
        ("uri-reference", ["/a/b", "", "#frag", "../x?y"], ["a b", "%zz", "#a#b"]),
        ("uuid", ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000"]),
        ("json-pointer", ["", "/a~1b/0", "/"], ["a", "/~2"]),
    ],
)
def test_format_examples(name: str, accepted: list[str], rejected: list[str]) -> None:
    regex = format_regex(name)
    assert regex is not None
    assert [text for text in accepted if not full(regex, text)] == []
    assert [text for text in rejected if full(regex, text)] == []
