"""Client-given text made safe to show: in a log line, on a terminal, in a spreadsheet.

A model id or a path comes from whoever sent the request. Written as it is, a newline forges a
log line, an escape sequence drives the terminal that reads `logs` or `audit tail`, and a cell
that starts with `=` is a formula to the spreadsheet that opens `audit query --csv`.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What spreadsheets read as the start of a formula (OWASP's list).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """`text` with every character Python does not call printable (controls, bidirectional
    overrides and other format characters, line separators, surrogates, spaces other than ' ')
    written as an escape (`\\n`, `\\x1b`, `\\u202e`): one line, and nothing a terminal acts on."""
    if text.isprintable():
        return text
    return "".join(_escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    if ch.isprintable():
        return ch
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def spreadsheet_safe(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula gets a leading
    apostrophe (numbers are left alone)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value
