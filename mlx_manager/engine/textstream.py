"""Turn a job's tokens into text deltas: streaming detokenization plus OpenAI stop strings.

Text that could be the start of a stop string is held back until it is known not to be
one, so a client never sees part of a stop string. Matching is linear in the text: each stop
string has a Knuth-Morris-Pratt automaton that reads every character once, so long or many
stop strings cost no more per token than their count (a naive suffix search was quadratic).
"""

from __future__ import annotations

from typing import Any


class _StopMatcher:
    """How much of one stop string the text ends with, updated a character at a time."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        self._fail = [0] * len(stop)  # KMP: longest proper border of each prefix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, char: str) -> bool:
        """Read one character; True when the stop string is complete."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self._fail[k - 1]
        if self.stop[k] == char:
            k += 1
        self.matched = k
        return k == len(self.stop)


class TextStream:
    def __init__(self, detokenizer: Any, stop: list[str]) -> None:
        self._detokenizer = detokenizer
        self._matchers = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self._held = ""
        self.stopped = False  # a stop string was found: the job is over
        self.matched: str | None = None  # which one

    def add(self, token: int) -> str:
        self._detokenizer.add_token(token)
        return self._feed(self._detokenizer.last_segment, final=False)

    def finish(self) -> str:
        self._detokenizer.finalize()
        return self._feed(self._detokenizer.last_segment, final=True)

    def _feed(self, segment: str, final: bool) -> str:
        if self.stopped:
            return ""
        if not self._matchers:
            return segment
        text = self._held + segment
        start = len(self._held)
        for i in range(start, len(text)):
            for matcher in self._matchers:
                if matcher.feed(text[i]):
                    self.stopped = True
                    self.matched = matcher.stop
                    self._held = ""
                    return text[: i + 1 - len(matcher.stop)]
        if final:
            self._held = ""
            return text
        keep = max(m.matched for m in self._matchers)  # may be the start of a stop string
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
