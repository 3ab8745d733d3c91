"""Turn a job's tokens into text deltas: streaming detokenization plus OpenAI stop strings.

Text that could be the start of a stop string is held back until it is known not to be
one, so a client never sees part of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stop: list[str]) -> None:
        self._detokenizer = detokenizer
        self._stop = [s for s in stop if s]
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
        text = self._held + segment
        if not self._stop:
            self._held = ""
            return text
        found = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            self.stopped = True
            self._held = ""
            return text[:cut]
        if final:
            self._held = ""
            return text
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
