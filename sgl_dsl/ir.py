"""The expressions a program appends to its state (``s += ...``), and their sampling parameters.

Names follow ``sglang.lang.ir`` so code that builds expressions by hand keeps working.
Expressions are plain immutable descriptions; executing them is the interpreter's job.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import TYPE_CHECKING, Any

from sgl_dsl.choices import ChoicesSamplingMethod

if TYPE_CHECKING:
    from sgl_dsl.interpreter import StreamExecutor

# The dtype shorthands, exactly as SGLang spells them.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""
_DTYPE_REGEX: dict[Any, tuple[str, list[str]]] = {
    int: (REGEX_INT, [" ", "\n"]),
    "int": (REGEX_INT, [" ", "\n"]),
    float: (REGEX_FLOAT, [" ", "\n"]),
    "float": (REGEX_FLOAT, [" ", "\n"]),
    str: (REGEX_STR, []),
    "str": (REGEX_STR, []),
    bool: (REGEX_BOOL, []),
    "bool": (REGEX_BOOL, []),
}
_SRT_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "n",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
    "regex",
    "json_schema",
)
_REQUEST_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num")


def json_schema_text(schema: Any) -> str | None:
    """A JSON schema given as a dict, a JSON string or a pydantic model class, as JSON text."""
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, (dict, bool)):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise TypeError(
        "json_schema must be a dict, a JSON string or a pydantic model class, "
        f"got {type(schema).__name__}"
    )


def _as_list(value: Any) -> list[Any]:
    if value is None or value == ():
        return []
    return [value] if isinstance(value, (str, int)) else list(value)


@dataclasses.dataclass
class SglSamplingParams:
    """Sampling parameters of one ``gen``: ``None`` means "inherit the run's default"."""

    max_new_tokens: int | None = 128
    min_new_tokens: int | None = 0
    n: int | None = 1
    stop: str | list[str] | tuple = ()
    stop_token_ids: list[int] | tuple | None = ()
    stop_regex: str | list[str] | tuple | None = ()
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    ignore_eos: bool | None = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    json_schema: str | None = None
    dtype: Any = None
    regex: str | None = None

    def clone(self) -> SglSamplingParams:
        return dataclasses.replace(
            self,
            stop=list(_as_list(self.stop)),
            stop_token_ids=list(_as_list(self.stop_token_ids)),
            stop_regex=list(_as_list(self.stop_regex)),
        )

    def override(self, other: SglSamplingParams, extra_stop: list[str]) -> SglSamplingParams:
        """These defaults overridden by ``other``'s non-None fields, plus ``extra_stop``."""
        out = self.clone()
        for f in dataclasses.fields(other):
            value = getattr(other, f.name)
            if value is not None:
                setattr(out, f.name, value)
        out.stop = _as_list(out.stop) + [s for s in extra_stop if s not in _as_list(out.stop)]
        out.stop_token_ids = _as_list(out.stop_token_ids)
        out.stop_regex = _as_list(out.stop_regex)
        out.json_schema = json_schema_text(out.json_schema)
        if out.dtype is not None:
            if out.dtype not in _DTYPE_REGEX:
                raise ValueError(f"invalid dtype {out.dtype!r}: use int, float, str or bool")
            out.regex, stops = _DTYPE_REGEX[out.dtype]
            out.stop = out.stop + [s for s in stops if s not in out.stop]
        return out

    def to_srt_kwargs(self) -> dict[str, Any]:
        """SGLang-native ``sampling_params`` (the engine and ``POST /generate`` take these)."""
        out = {name: getattr(self, name) for name in _SRT_FIELDS}
        return {k: v for k, v in out.items() if v is not None}

    def request_kwargs(self) -> dict[str, Any]:
        """Request-level fields (logprobs) that are set, as ``/generate`` names them."""
        out = {name: getattr(self, name) for name in _REQUEST_FIELDS}
        return {k: v for k, v in out.items() if v is not None}

    def to_openai_kwargs(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_new_tokens,
            "n": self.n,
            "stop": _as_list(self.stop) or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        }


class SglExpr:
    """Base of all expressions; ``a + b`` concatenates into an :class:`SglExprList`."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.node_id = next(SglExpr._ids)

    def __add__(self, other: SglExpr | str) -> SglExprList:
        return _concat(self, as_expr(other))

    def __radd__(self, other: SglExpr | str) -> SglExprList:
        return _concat(as_expr(other), self)


def as_expr(value: SglExpr | str) -> SglExpr:
    """Strings become constant text; anything else must already be an expression."""
    if isinstance(value, SglExpr):
        return value
    if isinstance(value, str):
        return SglConstantText(value)
    raise TypeError(f"cannot append {type(value).__name__} to a program state: {value!r}")


def _concat(a: SglExpr, b: SglExpr) -> SglExprList:
    left = a.expr_list if isinstance(a, SglExprList) else [a]
    right = b.expr_list if isinstance(b, SglExprList) else [b]
    return SglExprList(left + right)


class SglExprList(SglExpr):
    def __init__(self, expr_list: list[SglExpr]) -> None:
        super().__init__()
        self.expr_list = expr_list

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


class SglConstantText(SglExpr):
    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglArgument(SglExpr):
    """A symbolic program argument while tracing; formatting it into an f-string is an error."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__()
        self.name = name
        self.value = value

    def __format__(self, spec: str) -> str:
        raise TypeError(
            f"cannot put the argument {self.name!r} inside an f-string while tracing; "
            "append it to the state instead (s += 'text' + arg)"
        )

    def __repr__(self) -> str:
        return f"Argument({self.name})"


class SglGen(SglExpr):
    def __init__(self, name: str | None, sampling_params: SglSamplingParams) -> None:
        super().__init__()
        self.name = name
        self.sampling_params = sampling_params

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    def __init__(
        self,
        name: str | None,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> None:
        super().__init__()
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglImage(SglExpr):
    def __init__(self, path: Any) -> None:
        super().__init__()
        self.path = path

    def __repr__(self) -> str:
        return f"Image({self.path!r})"


class SglVideo(SglExpr):
    def __init__(self, path: str, num_frames: int) -> None:
        super().__init__()
        self.path = path
        self.num_frames = num_frames

    def __repr__(self) -> str:
        return f"Video({self.path!r}, {self.num_frames})"


class SglVariable(SglExpr):
    """The value of variable ``name`` of another stream (a data edge while tracing)."""

    def __init__(self, name: str, source: StreamExecutor | Any) -> None:
        super().__init__()
        self.name = name
        self.source = source

    def __repr__(self) -> str:
        return f"Variable({self.name!r})"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeBegin({self.name!r})"


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeEnd({self.name!r})"


class SglCommitLazy(SglExpr):
    """Send the text so far to the backend as a prefill-only request (a cache hint)."""

    def __repr__(self) -> str:
        return "CommitLazy()"


class SglConcateAndAppend(SglExpr):
    """Append each forked state's text (after its fork point) to this state."""

    def __init__(self, states: list[Any]) -> None:
        super().__init__()
        self.states = states

    def __repr__(self) -> str:
        return f"ConcateAndAppend({len(self.states)} states)"


class SglFork(SglExpr):
    """The point where ``children`` start as copies of this stream."""

    def __init__(self, children: list[StreamExecutor], hint: bool) -> None:
        super().__init__()
        self.children = children
        self.hint = hint

    def __repr__(self) -> str:
        return f"Fork({len(self.children)})"


class SglJoinGather(SglExpr):
    """Wait for ``children`` and gather their variables ``names`` into lists on this stream."""

    def __init__(self, children: list[Any], names: list[str]) -> None:
        super().__init__()
        self.children = children
        self.names = names

    def __repr__(self) -> str:
        return f"JoinGather({len(self.children)} states, {self.names})"


class SglRaise(SglExpr):
    """Fail the stream with ``error`` (the program body raised it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def __repr__(self) -> str:
        return f"Raise({self.error!r})"


class SglSeparateReasoning(SglExpr):
    """Split the reasoning (``<think>...</think>``) out of the variables of ``expr``."""

    def __init__(self, model_type: str | None, expr: SglExpr | None) -> None:
        super().__init__()
        self.model_type = model_type
        self.expr = expr
        self.names = [reasoning_name(n) for n in gen_names(expr)]

    def __repr__(self) -> str:
        return f"SeparateReasoning({self.model_type!r}, {self.names})"


def reasoning_name(name: str | None) -> str:
    if not name:
        raise ValueError("separate_reasoning needs a named gen or select")
    return f"{name}_reasoning_content"


def gen_names(expr: SglExpr | None) -> list[str | None]:
    """Names of the gens and selects in ``expr``."""
    if isinstance(expr, (SglGen, SglSelect)):
        return [expr.name]
    if isinstance(expr, SglExprList):
        return [n for e in expr.expr_list for n in gen_names(e)]
    return []


def produced_names(expr: SglExpr) -> list[str]:
    """The variable names that ``expr`` will set (readers of them wait from submission on).

    A var scope's name is announced by its begin and set by its end."""
    if isinstance(expr, (SglGen, SglSelect)):
        return [expr.name] if expr.name is not None else []
    if isinstance(expr, SglVarScopeBegin):
        return [expr.name]
    if isinstance(expr, (SglSeparateReasoning, SglJoinGather)):
        return list(expr.names)
    if isinstance(expr, SglExprList):
        return [n for e in expr.expr_list for n in produced_names(e)]
    return []
