"""Typer 0.29's rich help prints a type after every option, a flag's too (`--follow -f <bool>`), as
if a flag took a value. Its plain help does not; this makes the rich one agree: no type for a flag."""

from __future__ import annotations

from typing import Any

from typer.core import TyperOption

_display_type_rich = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx: Any) -> str | None:
    if self.is_flag or self.count:
        return None
    return _display_type_rich(self, ctx=ctx)


def install() -> None:
    TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]
