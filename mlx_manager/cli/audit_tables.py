"""Tables of audit rows and stats that fit the terminal: which columns, how wide, what is shortened.

The row table's columns come from `AuditRecord`'s field specs (`audit.record.SPECS`). When the
terminal is too narrow, long request ids and model ids are shortened first (ids at the end,
models in the middle), then columns go by priority; the ones that identify a row, and the one
the user filtered or grouped by, always stay. `--wide` shows every column at full width.
Text a client chose (a model id, an endpoint) is shown with its control characters escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from rich.console import Console
from rich.text import Text

from mlx_manager.audit.record import SPECS, Column
from mlx_manager.escape import printable

Cell = str | Text
GAP = 2  # spaces between two columns
SHORT_ID = 10  # a shortened request id: 9 characters and an ellipsis, as wide as its header
SHORT_MODEL = 20

_STATUS_STYLES = {"success": "green", "error": "red", "timeout": "yellow", "cancelled": "magenta"}


@dataclass(frozen=True, slots=True)
class TableColumn:
    """One column of a table: where its value comes from and how it is shown and shortened."""

    key: str
    header: str
    render: Callable[[Any], Cell]
    justify: Literal["left", "right"] = "left"
    priority: int | None = 1  # 0: always shown; higher goes first; None: only with --wide
    width: int = 0  # the minimum
    shorten: Literal["end", "middle"] | None = None
    short_width: int = 0


@dataclass(frozen=True, slots=True)
class Layout:
    """The columns a table shows, at which widths, and the ones left out for lack of room."""

    columns: tuple[TableColumn, ...]
    widths: tuple[int, ...]
    hidden: tuple[str, ...]  # headers
    total: int

    def render(self, rows: Sequence[dict[str, Any]], *, header: bool = True) -> Text:
        """The lines of the table: the header and a rule (unless `header` is false), then one per row.

        Every width is known already, so the lines are put together directly: a rich Table
        would measure and wrap each cell again, at a cost a short command notices.
        """
        shown = list(zip(self.columns, self.widths, strict=True))
        lines = Text(end="")
        if header:
            _add_line(lines, [(Text(c.header), c.justify, width) for c, width in shown])
            lines.append("─" * self.total + "\n")
        for row in rows:
            _add_line(lines, [(self.cell(c, row.get(c.key), width), c.justify, width) for c, width in shown])
        return lines

    def cell(self, column: TableColumn, value: Any, width: int) -> Cell:
        shown = column.render(value)
        if column.shorten and _length(shown) > width:
            return shorten(shown, width, column.shorten)
        return shown

    def note(self) -> str | None:
        if not self.hidden:
            return None
        return f"Hidden to fit the terminal: {', '.join(self.hidden)} (--wide shows every column)."


def fit(
    columns: Sequence[TableColumn],
    rows: Sequence[dict[str, Any]],
    width: int,
    *,
    wide: bool = False,
    keep: Collection[str] = (),
) -> Layout:
    """Choose the columns and their widths for `rows` in `width` characters.

    `keep` names columns that stay whatever the width (what the user filtered or grouped by);
    with `wide`, every column is shown at full width, whatever the terminal.
    """
    candidates = [c for c in columns if wide or c.priority is not None or c.key in keep]
    natural = {
        c.key: max(c.width, len(c.header), *(_length(c.render(row.get(c.key))) for row in rows)) for c in candidates
    }
    hidden: set[str] = set()

    def total(extra: TableColumn | None = None) -> int:
        shown = [c for c in candidates if c.key not in hidden or c is extra]
        return sum(natural[c.key] for c in shown) + GAP * (len(shown) - 1)

    if not wide and total() > width:
        for column in candidates:
            if column.shorten and natural[column.key] > column.short_width:
                natural[column.key] = max(column.short_width, column.width, len(column.header))
        droppable = [c for c in candidates if c.priority and c.key not in keep]
        for column in sorted(droppable, key=lambda c: c.priority or 0, reverse=True):
            if total() <= width:
                break
            hidden.add(column.key)
        for column in sorted(droppable, key=lambda c: c.priority or 0):  # put back what fits, most useful first
            if column.key in hidden and total(extra=column) <= width:
                hidden.discard(column.key)
    shown = tuple(c for c in candidates if c.key not in hidden)
    return Layout(
        columns=shown,
        widths=tuple(natural[c.key] for c in shown),
        hidden=tuple(c.header for c in candidates if c.key in hidden),
        total=total(),
    )


def print_table(
    console: Console, layout: Layout, rows: Sequence[dict[str, Any]], *, header: bool = True, caption: str | None = None
) -> None:
    """Print rows in this layout; a table wider than the terminal (--wide) is not cut or folded."""
    console.print(layout.render(rows, header=header), soft_wrap=True, highlight=False, end="")
    if caption:
        console.print(caption, markup=False, highlight=False)


def _add_line(out: Text, cells: list[tuple[Cell, Literal["left", "right"], int]]) -> None:
    last = len(cells) - 1
    for at, (value, justify, width) in enumerate(cells):
        text = value if isinstance(value, Text) else Text(value)
        if len(text) > width:  # a later row (tail --follow) longer than the first ones
            text = Text(text.plain[: width - 1] + "…", style=text.style)
        padding = " " * (width - len(text))
        if at:
            out.append(" " * GAP)
        if justify == "right":
            out.append(padding)
        out.append_text(text)
        if justify == "left" and at < last:
            out.append(padding)
    out.append("\n")


def shorten(value: Cell, width: int, where: Literal["end", "middle"] | None) -> Cell:
    """`value` in at most `width` characters, with an ellipsis where characters were left out."""
    text = value.plain if isinstance(value, Text) else value
    if len(text) <= width or width < 2:
        return value
    if where == "middle":
        head = (width - 1) // 2
        tail = width - 1 - head
        return text[:head] + "…" + text[len(text) - tail :]
    return text[: width - 1] + "…"


def _length(value: Cell) -> int:
    return len(value.plain if isinstance(value, Text) else value)


# -- the audit row table: its columns come from the record's fields ----------------------------


def _time(value: str) -> str:
    return value[:19].replace("T", " ")


def _status(value: str) -> Text:
    return Text(printable(value), style=_STATUS_STYLES.get(value, ""))


def _plain(value: Any) -> str:
    return printable(str(value))


def _ms(value: float) -> str:
    return f"{value:,.0f}"


def _count(value: int) -> str:
    return f"{value:,}"


def _flag(value: int) -> str:
    return "yes" if value else "no"


_RENDER: dict[str, Callable[[Any], Cell]] = {
    "time": _time,
    "status": _status,
    "ms": _ms,
    "count": _count,
    "flag": _flag,
    "code": _plain,
    "id": _plain,
    "model": _plain,
    "text": _plain,
}


def _dash_for_none(render: Callable[[Any], Cell]) -> Callable[[Any], Cell]:
    return lambda value: "-" if value is None else render(value)


def _row_column(name: str, spec: Column) -> TableColumn:
    column = TableColumn(
        key=name,
        header=spec.header,
        render=_dash_for_none(_RENDER[spec.kind]),
        justify=spec.justify,
        priority=spec.priority,
        width=spec.width,
    )
    if spec.kind == "id":
        return replace(column, shorten="end", short_width=SHORT_ID)
    if spec.kind == "model":
        return replace(column, shorten="middle", short_width=SHORT_MODEL)
    return column


ROW_COLUMNS: tuple[TableColumn, ...] = tuple(
    _row_column(name, spec) for name, spec in sorted(SPECS.items(), key=lambda item: item[1].position)
)


# -- the stats table ---------------------------------------------------------------------------


def _share(count: int, requests: int) -> str:
    return f"{count:,} ({count / requests:.1%})"


def _number(value: float | None, *, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def stats_columns(by: str | None) -> tuple[TableColumn, ...]:
    """The stats table's columns; grouped by `by`, its column comes first and always stays."""
    group = []
    if by:
        group = [
            TableColumn(
                by,
                by,
                _dash_for_none(_plain),
                priority=0,
                shorten="middle" if by == "model" else None,
                short_width=SHORT_MODEL,
            )
        ]
    measures = [
        TableColumn("requests", "requests", _count, "right", priority=1),
        TableColumn("errors", "errors", str, "right", priority=2),
        TableColumn("p50_duration_ms", "p50 ms", _number, "right", priority=3),
        TableColumn("p95_duration_ms", "p95 ms", _number, "right", priority=4),
        TableColumn("tokens_per_second", "tokens/s", lambda v: _number(v, digits=1), "right", priority=5),
        TableColumn("timeouts", "timeouts", str, "right", priority=6),
        TableColumn("mean_ttft_ms", "mean TTFT ms", _number, "right", priority=7),
        TableColumn("cancelled", "cancelled", str, "right", priority=8),
    ]
    order = [
        "requests",
        "errors",
        "timeouts",
        "cancelled",
        "p50_duration_ms",
        "p95_duration_ms",
        "mean_ttft_ms",
        "tokens_per_second",
    ]
    return (*group, *sorted(measures, key=lambda c: order.index(c.key)))


def stats_rows(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups with their error, timeout and cancelled counts shown with their share of requests."""
    shares = ("errors", "timeouts", "cancelled")
    return [{**group, **{name: _share(group[name], group["requests"]) for name in shares}} for group in groups]
