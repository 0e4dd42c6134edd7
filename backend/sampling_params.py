"""Sampling parameters of one generation request, shared by the language, the engine and the server.

Contract:
- Field names and defaults follow SGLang's native ``sampling_params``.
- Construction normalizes and validates (``__post_init__`` calls :meth:`SamplingParams.validate`),
  so every instance that exists is valid. ``validate()`` may be called again after mutating a
  field; it re-normalizes in place and raises ``ValueError`` naming the parameter and the value.
- Normalizations: ``stop`` and ``stop_regex`` ``str | Sequence[str] | None`` -> ``list[str]``
  (each ``stop_regex`` entry must compile with :mod:`re`); ``stop_token_ids``
  ``Iterable[int] | None`` -> ``list[int]``; ``top_k == 0`` -> ``-1`` (disabled); integral
  floats are not accepted where an ``int`` is required, and ``bool`` is never an ``int`` here.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

try:  # the parser of `re` (Python 3.11+; `sre_parse` before)
    import re._parser as _re_parser  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import sre_parse as _re_parser  # type: ignore[no-redef]

_SEED_ALIASES = ("sampling_seed",)
_UNSUPPORTED = {
    "ebnf": "EBNF grammars are not supported; use regex or json_schema",
    "structural_tag": "structural tags are not supported; use regex or json_schema",
}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample one request; see the module docstring for the validation contract."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1
    regex: str | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The accepted parameter names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a JSON-like mapping (``None`` -> all defaults).

        A value of ``None`` means "use the default" for every key (clients send explicit
        nulls). ``sampling_seed`` is accepted as an alias of ``seed``. An unknown key raises
        ``ValueError`` naming it and listing the valid keys.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling params must be a mapping, got {type(d).__name__}")
        valid = cls.field_names()
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = "seed" if key in _SEED_ALIASES else key
            if name in _UNSUPPORTED and value is not None:
                raise ValueError(f"sampling parameter {key!r}: {_UNSUPPORTED[name]}")
            if name not in valid:
                accepted = ", ".join((*valid, *_SEED_ALIASES))
                raise ValueError(
                    f"unknown sampling parameter {key!r}; valid parameters: {accepted}"
                )
            if value is None:
                continue
            if name in kwargs and kwargs[name] != value:
                raise ValueError(
                    f"sampling parameter 'seed' given twice with different values "
                    f"({kwargs[name]!r} and {value!r})"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serializable dict (lists are copies)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, list) else value
        return out

    # ------------------------------------------------------------------ properties

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``("regex", pattern)`` or ``("json_schema", schema_json)``, or None."""
        if self.regex is not None:
            return "regex", self.regex
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        return None

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: ``temperature == 0`` or ``top_k == 1``."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """True when any of the repetition, frequency or presence penalties is active."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Normalize fields in place, then raise ``ValueError`` on the first invalid one."""
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("max_new_tokens", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if not _is_real(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            setattr(self, name, value)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self.stop = self._normalize_stop(self.stop)
        self.stop_regex = self._normalize_stop(self.stop_regex, "stop_regex")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except (re.error, OverflowError, RecursionError) as exc:
                raise ValueError(
                    f"stop_regex: invalid regular expression {pattern!r}: {exc}"
                ) from None
            if _nested_unbounded_repeat(pattern):
                raise ValueError(
                    f"stop_regex {pattern!r}: an unbounded repetition inside another one "
                    "(like '(a+)+') can take exponential time to search; not supported"
                )
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.no_stop_trim, bool):
            raise ValueError(f"no_stop_trim must be a bool, got {self.no_stop_trim!r}")
        self._validate_constraint()
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
            self.seed = int(self.seed)

    def _validate_constraint(self) -> None:
        """``json_schema`` may be given as a dict (normalized to its JSON text)."""
        if isinstance(self.json_schema, (dict, bool)):
            self.json_schema = json.dumps(self.json_schema)
        for name in ("regex", "json_schema"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        if self.regex is not None and self.json_schema is not None:
            raise ValueError("give at most one of regex and json_schema")

    @staticmethod
    def _normalize_stop(stop: object, name: str = "stop") -> list[str]:
        """``None`` / a string / an iterable of non-empty strings -> ``list[str]``."""
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Iterable) or isinstance(stop, (bytes, Mapping)):
            raise ValueError(f"{name} must be a string or a list of strings, got {stop!r}")
        out = list(stop)
        for s in out:
            if not isinstance(s, str):
                raise ValueError(f"{name} must contain only strings, got {s!r} in {out!r}")
            if not s:
                raise ValueError(f"{name} must not contain empty strings, got {out!r}")
        return out

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes, Mapping)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
        out = list(ids)
        for t in out:
            if not _is_int(t):
                raise ValueError(f"stop_token_ids must contain only integers, got {t!r}")
            if t < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t} in {out!r}")
        return [int(t) for t in out]


def _nested_unbounded_repeat(pattern: str) -> bool:
    """True if `pattern` has an unbounded repetition (``*``, ``+``, ``{n,}``) inside another
    one: the shape of catastrophic backtracking (``(a+)+b``), which would stall the engine
    thread that searches stop regexes."""
    repeats = (_re_parser.MAX_REPEAT, _re_parser.MIN_REPEAT)

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                unbounded = arg[1] == _re_parser.MAXREPEAT
                if (unbounded and inside) or walk(arg[2], inside or unbounded):
                    return True
            elif op == _re_parser.SUBPATTERN:
                if walk(arg[3], inside):
                    return True
            elif op == _re_parser.BRANCH:
                if any(walk(branch, inside) for branch in arg[1]):
                    return True
            elif op in (_re_parser.ASSERT, _re_parser.ASSERT_NOT) and walk(arg[1], inside):
                return True
        return False

    return walk(_re_parser.parse(pattern), False)
