"""Views of a program state: HTML for Jupyter, plain text for terminals, live updates.

Contract: renderers read a :class:`~sgl_dsl.interpreter.StreamExecutor` without waiting for
it (a running state renders as far as it has got). The HTML shows role turns as labelled
blocks (template markup hidden), text that ``gen``/``select`` produced highlighted and
labelled with its variable name (a select's choices and scores in its tooltip), and forked
branches side by side under the point where they forked.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import time
from typing import TYPE_CHECKING, Any

from sgl_dsl.spans import Span

if TYPE_CHECKING:
    from sgl_dsl.interpreter import StreamExecutor

_STYLE = """<style>
.sgl-state{font-family:ui-monospace,monospace;font-size:12.5px;line-height:1.5;
  white-space:pre-wrap;border:1px solid #ccc;border-radius:6px;padding:6px;margin:2px}
.sgl-turn{border-left:3px solid #999;padding:2px 8px;margin:4px 0}
.sgl-role{font-size:10.5px;text-transform:uppercase;color:#666;display:block}
.sgl-system{border-color:#9e9e9e}.sgl-user{border-color:#1e88e5}
.sgl-assistant{border-color:#43a047}
.sgl-gen{background:#c8e6c9;border-radius:3px}.sgl-select{background:#ffe0b2;border-radius:3px}
.sgl-var{font-size:9.5px;color:#2e7d32;vertical-align:super;margin-left:1px}
.sgl-forks{display:flex;gap:6px;align-items:flex-start}
.sgl-forks>.sgl-state{flex:1;min-width:0}
.sgl-status{font-size:10.5px;color:#888}.sgl-error{color:#c62828}
</style>"""
_ids = itertools.count()


def _tooltip(span: Span) -> str:
    if span.kind != "select":
        return f"gen {span.name!r}"
    scores = span.detail.get("scores") or []
    rows = [
        f"{c!r}: {s:.3f}" if isinstance(s, (int, float)) else repr(c)
        for c, s in itertools.zip_longest(span.detail.get("choices", []), scores)
    ]
    return f"select {span.name!r}\n" + "\n".join(rows)


def _marked(text: str, start: int, end: int, spans: list[Span]) -> str:
    """``text[start:end]`` as HTML with the generated spans inside it highlighted."""
    out, pos = [], start
    for span in sorted((s for s in spans if s.kind != "role"), key=lambda s: s.start):
        lo, hi = max(span.start, pos), min(span.end, end, len(text))
        if lo >= hi:
            continue
        out.append(html.escape(text[pos:lo]))
        label = html.escape(span.name or "")
        out.append(
            f'<span class="sgl-{span.kind}" title="{html.escape(_tooltip(span))}">'
            f'{html.escape(text[lo:hi])}</span><span class="sgl-var">{label}</span>'
        )
        pos = hi
    out.append(html.escape(text[pos:end]))
    return "".join(out)


def _body(exe: StreamExecutor, start: int) -> str:
    """The state's text from ``start``: role turns as blocks, markup between them hidden."""
    text, spans = exe.text_, exe.spans
    turns = sorted((s for s in spans if s.kind == "role" and s.end > start), key=lambda s: s.start)
    if exe.cur_role is not None and exe.cur_role_begin_pos is not None:
        turns.append(Span("role", exe.cur_role_begin_pos, len(text), exe.cur_role))
    if not turns:
        return _marked(text, start, len(text), spans)
    parts = []
    for turn in turns:
        role = html.escape(turn.name or "")
        inner = _marked(text, max(turn.start, start), turn.end, spans)
        parts.append(
            f'<div class="sgl-turn sgl-{role}"><span class="sgl-role">{role}</span>{inner}</div>'
        )
    tail_from = max(turns[-1].end, start)
    tail = text[tail_from:]
    if tail.strip() and exe.cur_role is None and not _is_markup(exe, tail):
        parts.append(_marked(text, tail_from, len(text), spans))
    return "".join(parts)


def _is_markup(exe: StreamExecutor, tail: str) -> bool:
    """Whether ``tail`` is only a role suffix of the chat template."""
    suffixes = {sfx for _, sfx in exe.chat_template.role_prefix_and_suffix.values()}
    return tail in suffixes or tail.strip() in {s.strip() for s in suffixes}


def state_html(exe: StreamExecutor, start: int = 0, status: bool = True) -> str:
    """One state (and, recursively, its forks) as an HTML fragment."""
    body = _body(exe, start)
    for position, children in exe.forks:
        if all(c.fork_start_text_pos is not None for c in children):
            branches = "".join(state_html(c, position, status=False) for c in children)
            body += f'<div class="sgl-forks">{branches}</div>'
    footer = ""
    if status:
        if exe.error_ is not None:
            footer = (
                f'<div class="sgl-status sgl-error">error: {html.escape(str(exe.error_))}</div>'
            )
        elif not exe.is_finished:
            footer = '<div class="sgl-status">running…</div>'
    return f'<div class="sgl-state">{body}{footer}</div>'


def program_state_html(exe: StreamExecutor) -> str:
    return _STYLE + state_html(exe)


def state_text(exe: StreamExecutor, width: int = 100) -> str:
    """A terminal-friendly summary: one line per role turn (or the text), then variables."""
    lines = []
    if exe.messages_:
        for m in exe.messages_:
            content = str(m["content"]).replace("\n", "\\n")
            lines.append(f"  [{m['role']}] {_clip(content, width)}")
    else:
        lines.append("  " + _clip(exe.text_.replace("\n", "\\n"), width))
    names = [n for n in exe.variables if not n.endswith("_reasoning_content")]
    state = "error" if exe.error_ is not None else "finished" if exe.is_finished else "running"
    head = f"ProgramState({state}, variables: {', '.join(names) or 'none'})"
    return "\n".join([head, *lines])


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def live(exe: StreamExecutor, interval: float = 0.1, timeout: float | None = None) -> None:
    """Show the state in the notebook and keep that one display updated until it finishes."""
    from IPython.display import HTML, display

    handle = display(HTML(program_state_html(exe)), display_id=f"sgl-{next(_ids)}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not exe.is_finished and (deadline is None or time.monotonic() < deadline):
        exe.changed.wait_until(lambda: exe.is_finished, interval)
        handle.update(HTML(program_state_html(exe)))
    handle.update(HTML(program_state_html(exe)))


async def live_async(exe: StreamExecutor, interval: float = 0.1) -> None:
    """:func:`live` for a running event loop (``await state.live_async()`` in Jupyter)."""
    import asyncio

    from IPython.display import HTML, display

    handle = display(HTML(program_state_html(exe)), display_id=f"sgl-{next(_ids)}")
    while not exe.is_finished:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exe.changed.wait_until_async(lambda: exe.is_finished), interval)
        handle.update(HTML(program_state_html(exe)))
    handle.update(HTML(program_state_html(exe)))


def graph_svg(traced: Any) -> str:
    """A traced program's graph as inline SVG: one column per stream, one box per node, order
    edges down each column, fork and join edges solid, data edges dashed. No Graphviz."""
    from sgl_dsl.tracer import ForkNode, JoinNode, describe_node, node_sources

    col_w, row_h, box_w, box_h = 230, 34, 210, 24
    place: dict[tuple[int, int], tuple[float, float]] = {}
    next_row: dict[int, int] = {}
    fork_row: dict[int, int] = {}  # child stream -> row of its fork node
    for stream in traced.streams:
        first = fork_row.get(stream.index, -1) + 1
        for i, node in enumerate(stream.nodes):
            place[(stream.index, i)] = (stream.index * col_w + 10, (first + i) * row_h + 30)
            if isinstance(node, ForkNode):
                for child in node.children:
                    fork_row[child.index] = first + i
        next_row[stream.index] = first + len(stream.nodes)
    height = max([y for _, y in place.values()], default=0) + 2 * row_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(traced.streams) * col_w + 20}" '
        f'height="{height}" font-family="monospace" font-size="11">'
        '<defs><marker id="sgl-arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>'
    ]

    def mid(key: tuple[int, int], side: str) -> tuple[float, float]:
        x, y = place[key]
        return {"top": (x + box_w / 2, y), "bottom": (x + box_w / 2, y + box_h),
                "right": (x + box_w, y + box_h / 2), "left": (x, y + box_h / 2)}[side]  # fmt: skip

    for stream in traced.streams:
        parts.append(
            f'<text x="{stream.index * col_w + 10}" y="16" font-weight="bold">'
            f"stream {stream.index}</text>"
        )
        for i, node in enumerate(stream.nodes):
            x, y = place[(stream.index, i)]
            label = html.escape(_clip(describe_node(node), 30))
            parts.append(
                f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" fill="#f5f5f5" '
                f'stroke="#999"/><text x="{x + 6}" y="{y + 16}">{label}</text>'
            )
            if i:
                parts.append(
                    _line(mid((stream.index, i - 1), "bottom"), mid((stream.index, i), "top"))
                )
            if isinstance(node, ForkNode):
                for child in node.children:
                    if child.nodes:
                        parts.append(
                            _line(mid((stream.index, i), "right"), mid((child.index, 0), "left"))
                        )
            if isinstance(node, JoinNode):
                for child in node.children:
                    if child.nodes:
                        last = (child.index, len(child.nodes) - 1)
                        parts.append(_line(mid(last, "left"), mid((stream.index, i), "right")))
            for src in node_sources(node):
                if src is not stream and src.nodes:
                    last = (src.index, len(src.nodes) - 1)
                    parts.append(_line(mid(last, "left"), mid((stream.index, i), "right"), True))
    parts.append("</svg>")
    return "".join(parts)


def _line(a: tuple[float, float], b: tuple[float, float], dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4,3"' if dashed else ""
    return (
        f'<line x1="{a[0]}" y1="{a[1]}" x2="{b[0]}" y2="{b[1]}" stroke="#555"{dash} '
        'marker-end="url(#sgl-arrow)"/>'
    )
