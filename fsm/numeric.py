"""Regexes for bounded integers and JSON numbers.

Every regex returned here is meant for full matching, uses only literals, character classes,
non-capturing groups, alternation and quantifiers, and is safe to concatenate with other regexes
(top-level alternations are wrapped in ``(?:...)``).
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

_ANY_FRACTION = r"(?:\.[0-9]+)?"
_ANY_EXPONENT = "[eE][+-]?[0-9]+"
_NONZERO_MANTISSA = r"(?:[1-9][0-9]*(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)"
_ZERO = r"-?0(?:\.0+)?(?:[eE][+-]?[0-9]+)?"


def _alt(parts: list[str]) -> str:
    """Alternation of ``parts`` (at least one), grouped when there is more than one."""
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _repeat(atom: str, low: int, high: int | None) -> str:
    """``atom`` repeated between ``low`` and ``high`` (None: unbounded) times."""
    if high is None:
        return atom + {0: "*", 1: "+"}.get(low, f"{{{low},}}")
    if low == high:
        return {0: "", 1: atom}.get(low, f"{atom}{{{low}}}")
    return atom + ("?" if (low, high) == (0, 1) else f"{{{low},{high}}}")


def _digit_class(low: int, high: int) -> str:
    """One digit in [low, high]."""
    return str(low) if low == high else f"[{low}-{high}]"


def _same_length(low: str, high: str) -> str:
    """Digit strings of ``len(low)`` valued in [low, high] (equal lengths, low <= high)."""
    prefix = 0
    while prefix < len(low) and low[prefix] == high[prefix]:
        prefix += 1
    if prefix == len(low):
        return low
    head, low, high = low[:prefix], low[prefix:], high[prefix:]
    rest = len(low) - 1
    low_full = low[1:] == "0" * rest
    high_full = high[1:] == "9" * rest
    first = int(low[0]) + (0 if low_full else 1)
    last = int(high[0]) - (0 if high_full else 1)
    parts = []
    if not low_full:
        parts.append(low[0] + _same_length(low[1:], "9" * rest))
    if first <= last:
        parts.append(_digit_class(first, last) + _repeat("[0-9]", rest, rest))
    if not high_full:
        parts.append(high[0] + _same_length("0" * rest, high[1:]))
    return head + _alt(parts)


def _natural_range(low: int, high: int | None) -> str:
    """Canonical decimal strings of the integers in [low, high]; 0 <= low <= high, None: no top."""
    if high is not None and high <= 9:
        return _digit_class(low, high)
    parts = []
    if low == 0:
        parts.append("0")
        low = 1
    low_len = len(str(low))
    high_len = None if high is None else len(str(high))
    if low_len == high_len:
        return _alt([*parts, _same_length(str(low), str(high))])
    full_from = low_len
    if low != 10 ** (low_len - 1):
        parts.append(_same_length(str(low), "9" * low_len))
        full_from += 1
    full_to = high_len
    if high is not None and high != 10**high_len - 1:
        full_to -= 1
    if full_to is None or full_from <= full_to:
        top = None if full_to is None else full_to - 1
        parts.append("[1-9]" + _repeat("[0-9]", full_from - 1, top))
    if high is not None and full_to != high_len:
        parts.append(_same_length("1" + "0" * (high_len - 1), str(high)))
    return _alt(parts)


def _check_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")


def integer_range_regex(minimum: int | None, maximum: int | None) -> str:
    """Regex matching exactly ``str(n)`` for every integer n in [minimum, maximum].

    ``None`` leaves that side unbounded. The regex has O(number of digits) alternatives.
    Raises ``ValueError`` when minimum > maximum and ``TypeError`` for non-int bounds.
    """
    _check_int("minimum", minimum)
    _check_int("maximum", maximum)
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ValueError(f"empty integer range: minimum {minimum} > maximum {maximum}")
    parts = []
    if minimum is None or minimum < 0:
        top = -1 if maximum is None else min(maximum, -1)
        parts.append("-" + _natural_range(-top, None if minimum is None else -minimum))
    if maximum is None or maximum >= 0:
        parts.append(_natural_range(0 if minimum is None else max(minimum, 0), maximum))
    return _alt(parts)


def _fraction_digits(
    low: str, low_strict: bool, high: str | None, high_strict: bool
) -> tuple[str | None, bool]:
    """Digit strings d with ``0.d`` above ``0.low`` and below ``0.high`` (None: below 1).

    ``low``/``high`` have no trailing zeros; strict flags exclude equality. Returns
    ``(regex for the non-empty such d or None, whether the empty d qualifies)``.
    """
    if high == "":
        if high_strict or low or low_strict:
            return None, False
        return "0+", True
    if low == "" and high is None:
        return ("[0-9]*[1-9][0-9]*", False) if low_strict else ("[0-9]+", True)
    empty_ok = low == "" and not low_strict
    low_digit, low_rest = (int(low[0]), low[1:]) if low else (0, "")
    high_digit, high_rest = (int(high[0]), high[1:]) if high is not None else (9, None)
    if low_digit == high_digit:
        branches = [(low_digit, _fraction_digits(low_rest, low_strict, high_rest, high_strict))]
        middle = None
    else:
        branches = [
            (low_digit, _fraction_digits(low_rest, low_strict, None, False)),
            (high_digit, _fraction_digits("", False, high_rest, high_strict)),
        ]
        middle = (low_digit + 1, high_digit - 1)
    parts = []
    for digit, (rest, rest_empty_ok) in branches:
        if rest is not None:
            parts.append(f"{digit}{_optional(rest)}" if rest_empty_ok else f"{digit}{rest}")
        elif rest_empty_ok:
            parts.append(str(digit))
    if middle is not None and middle[0] <= middle[1]:
        parts.append(_digit_class(*middle) + "[0-9]*")
    return (_alt(parts) if parts else None), empty_ok


def _optional(regex: str) -> str:
    """``regex`` made optional; a trailing ``+`` on a single atom becomes ``*``."""
    return regex[:-1] + "*" if regex in ("[0-9]+", "0+") else f"(?:{regex})?"


def _fraction_suffix(low: str, low_strict: bool, high: str | None, high_strict: bool) -> str | None:
    """Optional ``.digits`` suffix whose value obeys the bounds of ``_fraction_digits``."""
    digits, empty_ok = _fraction_digits(low, low_strict, high, high_strict)
    if digits is None:
        return "" if empty_ok else None
    return rf"(?:\.{digits})?" if empty_ok else rf"\.{digits}"


def _split(value: Fraction) -> tuple[int, str]:
    """(floor, digits of the fractional part without trailing zeros) of a terminating decimal."""
    whole = math.floor(value)
    rest = value - whole
    digits = []
    while rest:
        rest *= 10
        digit = math.floor(rest)
        digits.append(str(digit))
        rest -= digit
    return whole, "".join(digits)


def _plain_decimal(
    low: Fraction, low_strict: bool, high: Fraction | None, high_strict: bool
) -> str | None:
    """Strings ``(0|[1-9][0-9]*)(\\.[0-9]+)?`` valued in the interval (low >= 0); None if empty."""
    low_int, low_digits = _split(low)
    high_int, high_digits = (None, None) if high is None else _split(high)
    if low_int == high_int:
        return _with_suffix(str(low_int), low_digits, low_strict, high_digits, high_strict)
    # Integer parts strictly between the bounds' take any fraction; so does low_int when the
    # lower bound is an inclusive integer.
    free_from = low_int if not low_digits and not low_strict else low_int + 1
    parts: list[str | None] = []
    if free_from > low_int:
        parts.append(_with_suffix(str(low_int), low_digits, low_strict, None, False))
    free_to = None if high_int is None else high_int - 1
    if free_to is None or free_from <= free_to:
        parts.append(_natural_range(free_from, free_to) + _ANY_FRACTION)
    if high_int is not None:
        parts.append(_with_suffix(str(high_int), "", False, high_digits, high_strict))
    kept = [part for part in parts if part is not None]
    return _alt(kept) if kept else None


def _with_suffix(
    integer: str, low: str, low_strict: bool, high: str | None, high_strict: bool
) -> str | None:
    suffix = _fraction_suffix(low, low_strict, high, high_strict)
    return None if suffix is None else integer + suffix


def _normalize(value: Fraction) -> tuple[Fraction, int]:
    """(m, k) with value == m * 10**k and 1 <= m < 10, for value > 0."""
    whole, digits = _split(value)
    leading_zeros = len(digits) - len(digits.lstrip("0"))
    exponent = len(str(whole)) - 1 if whole else -(leading_zeros + 1)
    return value / Fraction(10) ** exponent, exponent


def _exponent_range(low: int | None, high: int | None) -> str:
    """Exponent digits ``[+-]?[0-9]+`` (leading zeros allowed) valued in [low, high]."""
    parts = []
    if high is None or high >= 0:
        parts.append(r"\+?0*" + _natural_range(0 if low is None else max(low, 0), high))
    if low is None or low < 0:
        top = -1 if high is None else min(high, -1)
        parts.append("-0*" + _natural_range(-top, None if low is None else -low))
    if (low is None or low <= 0) and (high is None or high >= 0):
        parts.append("-0+")
    return _alt(parts)


def _exponent_forms(
    low: Fraction, low_strict: bool, high: Fraction | None, high_strict: bool
) -> str | None:
    """Forms ``d(.ddd)?e±N`` (d in 1-9) valued in the interval; low > 0, or low == 0 strict.

    With m in [1, 10), m * 10**e is below a bound b * 10**k (b in [1, 10)) iff e < k, or e == k
    and m < b; so the exponent range splits into the bounds' own exponents and those between.
    """
    lower = _normalize(low) if low else None
    upper = _normalize(high) if high is not None else None
    # (mantissa low, low strict, mantissa high, high strict, exponent low, exponent high)
    pieces: list[tuple[Fraction, bool, Fraction, bool, int | None, int | None]] = []
    one, ten = Fraction(1), Fraction(10)
    if lower is not None and upper is not None and lower[1] == upper[1]:
        pieces.append((lower[0], low_strict, upper[0], high_strict, lower[1], lower[1]))
    else:
        if lower is not None:
            pieces.append((lower[0], low_strict, ten, True, lower[1], lower[1]))
        first = None if lower is None else lower[1] + 1
        last = None if upper is None else upper[1] - 1
        if first is None or last is None or first <= last:
            pieces.append((one, False, ten, True, first, last))
        if upper is not None:
            pieces.append((one, False, upper[0], high_strict, upper[1], upper[1]))
    parts = []
    for m_low, m_low_strict, m_high, m_high_strict, e_low, e_high in pieces:
        mantissa = _plain_decimal(m_low, m_low_strict, m_high, m_high_strict)
        if mantissa is not None:
            parts.append(mantissa + "[eE]" + _exponent_range(e_low, e_high))
    return _alt(parts) if parts else None


def _magnitude(low: Fraction, low_strict: bool, high: Fraction | None, high_strict: bool) -> str:
    """Unsigned JSON numbers valued in a non-empty interval of positive values (low == 0 strict)."""
    plain = _plain_decimal(low, low_strict, high, high_strict)
    assert plain is not None, "a non-empty interval always holds a terminating decimal"
    if not low and high is None:
        return _alt([plain, _NONZERO_MANTISSA + _ANY_EXPONENT])
    exponent = _exponent_forms(low, low_strict, high, high_strict)
    return plain if exponent is None else _alt([plain, exponent])


def _to_fraction(name: str, bound: float | None) -> Fraction | None:
    if bound is None:
        return None
    if isinstance(bound, bool) or not isinstance(bound, (int, float)):
        raise TypeError(f"{name} must be an int, a float or None, got {bound!r}")
    value = Decimal(str(bound))
    if not value.is_finite():
        raise ValueError(f"{name} must be finite, got {bound!r}")
    return Fraction(value)


def number_range_regex(
    minimum: float | None,
    maximum: float | None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> str:
    """Regex for RFC 8259 JSON numbers whose exact value lies within the bounds.

    Bounds are compared by the exact value of ``Decimal(str(bound))``; ``None`` is unbounded.
    Accepted, for values in range:

    * every plain form ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``;
    * zero in every form, ``-0``, ``0.00`` and ``0e5`` included;
    * exponent forms (``e``/``E``, optional sign, leading zeros allowed) with a normalized mantissa
      ``[1-9](\\.[0-9]+)?`` -- the forms ``json.dumps`` produces, e.g. ``1e-05``, ``1.5e+16``;
    * exponent forms with any mantissa (``12.5e3``) for a sign whose values are all in range,
      e.g. the positive side of ``minimum=0`` or the negative side of ``maximum=0``.

    So every ``json.dumps`` of an in-range int or finite float matches. Never matches anything
    out of range. Raises ``ValueError`` for an empty range or a non-finite bound.
    """
    low = _to_fraction("minimum", minimum)
    high = _to_fraction("maximum", maximum)
    if (
        low is not None
        and high is not None
        and (low > high or (low == high and (exclusive_minimum or exclusive_maximum)))
    ):
        raise ValueError(
            f"empty number range: minimum {minimum} (exclusive={exclusive_minimum}) "
            f"and maximum {maximum} (exclusive={exclusive_maximum})"
        )
    zero = Fraction(0)
    parts = []
    if (low is None or low < 0 or (low == 0 and not exclusive_minimum)) and (
        high is None or high > 0 or (high == 0 and not exclusive_maximum)
    ):
        parts.append(_ZERO)
    if high is None or high > 0:
        positive_low, strict = (low, exclusive_minimum) if low and low > 0 else (zero, True)
        parts.append(_magnitude(positive_low, strict, high, exclusive_maximum))
    if low is None or low < 0:
        negative_low, strict = (-high, exclusive_maximum) if high and high < 0 else (zero, True)
        negative_high = None if low is None else -low
        parts.append("-" + _magnitude(negative_low, strict, negative_high, exclusive_minimum))
    return _alt(parts)
