"""Regexes for JSON-schema ``format`` values, applied to the decoded string (not JSON-escaped).

Enforced formats: ``date``, ``time``, ``date-time``, ``duration``, ``email``, ``idn-email``,
``hostname``, ``ipv4``, ``ipv6``, ``uri``, ``uri-reference``, ``iri``, ``iri-reference``,
``uuid`` and ``json-pointer``. Every regex is sound (each match is valid for the RFC and for
``jsonschema.Draft202012Validator.FORMAT_CHECKER``) but may reject rare valid values (see
``format_regex``). Any other format (``regex``, ``idn-hostname``, ``uri-template``,
``relative-json-pointer``, custom names) is annotation-only: ``format_regex`` returns ``None``.
"""

from __future__ import annotations

_HEX = "[0-9A-Fa-f]"

_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_DATE = f"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_HOUR = "(?:[01][0-9]|2[0-3])"
_TIME = (
    rf"{_HOUR}:[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    rf"(?:Z|[+\-]{_HOUR}:[0-5][0-9])"
)

_DURATION_TIME = "T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
_DURATION = (
    "P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)"
    f"(?:{_DURATION_TIME})?|{_DURATION_TIME}|[0-9]+W)"
)

_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"


def _ipv6() -> str:
    """RFC 4291 text forms: 8 hex groups, or fewer around one ``::`` that stands for >= 1 group;
    an IPv4 tail counts as two groups."""
    group = f"{_HEX}{{1,4}}"

    def groups(count: int) -> str:
        return "" if count == 0 else f"{group}(?::{group}){{{count - 1}}}"

    forms = [groups(8), f"{groups(6)}:{_IPV4}"]
    for left in range(8):
        right = f"(?:{group}(?::{group}){{0,{6 - left}}})?" if left < 7 else ""
        forms.append(f"{groups(left)}::{right}")
    for left in range(6):
        forms.append(f"{groups(left)}::(?:{group}:){{0,{5 - left}}}{_IPV4}")
    return "(?:" + "|".join(forms) + ")"


_IPV6 = _ipv6()


def _hostname() -> str:
    """RFC 1123 names: dot-separated labels of 1-63 letters, digits and inner hyphens.

    A regex cannot bound the total length (253) and the label lengths together compactly, so
    this is the union of three shapes that all stay within 253: up to 4 labels (the first of up
    to 63 characters, the others up to 62), up to 8 labels of up to 30, up to 16 of up to 14.
    """

    def label(size: int) -> str:
        return rf"[A-Za-z0-9](?:[A-Za-z0-9\-]{{0,{size - 2}}}[A-Za-z0-9])?"

    shapes = [
        rf"{label(63)}(?:\.{label(62)}){{0,3}}",
        rf"{label(30)}(?:\.{label(30)}){{0,7}}",
        rf"{label(14)}(?:\.{label(14)}){{0,15}}",
    ]
    return "(?:" + "|".join(shapes) + ")"


_HOSTNAME = _hostname()

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]"
_EMAIL = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_HOSTNAME}"

# RFC 3986, appendix A.
_UNRESERVED_SUB = r"A-Za-z0-9\-._~!$&'()*+,;="
_PCT = f"%{_HEX}{{2}}"
_PCHAR = f"(?:[{_UNRESERVED_SUB}:@]|{_PCT})"
_SEGMENT_NZ = f"{_PCHAR}+"
_SEGMENTS = f"(?:/{_PCHAR}*)*"
_HOST = (
    rf"(?:\[(?:{_IPV6}|v{_HEX}+\.[{_UNRESERVED_SUB}:]+)\]"
    f"|(?:[{_UNRESERVED_SUB}]|{_PCT})*)"
)
_AUTHORITY = f"(?:(?:[{_UNRESERVED_SUB}:]|{_PCT})*@)?{_HOST}(?::[0-9]*)?"
_QUERY_FRAGMENT = rf"(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?"
_SCHEME = r"[A-Za-z][A-Za-z0-9+\-.]*"
_ABSOLUTE_OR_EMPTY = f"//{_AUTHORITY}{_SEGMENTS}|/(?:{_SEGMENT_NZ}{_SEGMENTS})?"
_URI = f"{_SCHEME}:(?:{_ABSOLUTE_OR_EMPTY}|{_SEGMENT_NZ}{_SEGMENTS})?{_QUERY_FRAGMENT}"
_RELATIVE_REF = (
    f"(?:{_ABSOLUTE_OR_EMPTY}|(?:[{_UNRESERVED_SUB}@]|{_PCT})+{_SEGMENTS})?{_QUERY_FRAGMENT}"
)
_URI_REFERENCE = f"(?:{_URI}|{_RELATIVE_REF})"

_UUID = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_JSON_POINTER = "(?:/(?:[^/~]|~[01])*)*"

_FORMATS: dict[str, str] = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "duration": _DURATION,
    "email": _EMAIL,
    "idn-email": _EMAIL,
    "hostname": _HOSTNAME,
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "uri": _URI,
    "uri-reference": _URI_REFERENCE,
    "iri": _URI,
    "iri-reference": _URI_REFERENCE,
    "uuid": _UUID,
    "json-pointer": _JSON_POINTER,
}


def format_regex(name: str) -> str | None:
    """Regex (for full matching) of the string values valid for JSON-schema format ``name``.

    ``None`` for formats that are not enforced. Deliberate restrictions, all sound:
    years 0001-9999; seconds 00-59 (no leap second) and upper-case ``T``/``Z`` only;
    durations in RFC 3339 appendix A grammar; hostnames and email domains within the shapes
    of ``_hostname`` and without a trailing dot; email local parts as dot-atoms (no quoted
    strings, no 64-character limit) and no IP-literal domains; ``iri``/``iri-reference`` limited to
    ASCII URIs.
    """
    return _FORMATS.get(name)
