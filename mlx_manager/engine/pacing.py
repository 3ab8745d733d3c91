"""When prompts may be read while other streams are decoding, and for how long.

Every step of the inference thread is one decode round for the running streams, plus whatever
prompt reading the step is given. With nobody decoding, each prompt being read gets a full
`server.prefill_chunk` a step. While streams decode, reading a prompt holds up each of their
tokens, so it is rationed by time, in units of the measured decode round:

- **A joining prompt's first read** (`Plan.first`) is a *burst*: read alone for up to
  `BURST_ROUNDS` decode rounds. That is all of a conversation's next turn (its history is in the
  prompt cache). Bursts go to the shortest prompt first, one a step, so prompts that arrive
  together start one after another instead of all at the end.
- **The rest of a long prompt** is read in *paced reads* (`Plan.paced`) of up to `READ_ROUNDS`
  decode rounds each, with at least `GAP_ROUNDS` decode-only rounds between two reads. When more
  prompts wait than streams decode, a read may take that many times longer (at most
  `MAX_READS` times): each waiting request then gets about as much of the engine as each
  streaming one.

So while a long prompt is read, at most one token in `GAP_ROUNDS + 1` of each running stream
waits for a read (about 2%), by a bounded time; the others come at the usual pace. One prompt
joining several streams gets about `READ_ROUNDS / (READ_ROUNDS + GAP_ROUNDS)` of the engine (a
third).

Why not a small chunk in every step (what vLLM does on a GPU)? On a CPU, a prompt token at a
long context is dear when read alone: a model call has a fixed cost, and each read goes through
the prompt's whole KV cache once, however few tokens it has. Measured on the bench test model,
one token at a 3,000-token context cost more than a decode round of four streams. Reading a
token or two a step made every token of the running streams 3-4x slower, and a 4,000-token
prompt took a minute instead of 4 s; reads of ~100 ms keep the per-token cost near a full
chunk's.

Each read is a time box: it reads in pieces that grow while the next one, sized from the time
of the last, still fits (`batch.Prefill.read_for`). The decode round is timed on the rounds
that read no prompt (most of them), the median of the last `WINDOW`, so one step slowed by the
machine does not swing it.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

# A joining prompt's burst may take this many decode rounds: the one long gap it costs each
# running stream (mlx_lm.server and llama.cpp read a whole prompt chunk in one go, unbounded).
BURST_ROUNDS = 32
# The rest of a prompt: a read of up to READ_ROUNDS decode rounds, then GAP_ROUNDS rounds that
# read nothing. The issue's bound is on the running streams' p95 inter-token latency (at most
# 2x while a long prompt is read): with one token in 49 held up, the p95 is an ordinary round,
# with room for the odd round slowed by something else.
READ_ROUNDS = 24
GAP_ROUNDS = 48
MAX_READS = 3  # a read's box, in READ_ROUNDS, when many prompts wait for few streams
WINDOW = 7


@dataclass(frozen=True)
class Box:
    """How long one prompt may be read alone this step."""

    seconds: float | None  # None (no decode round timed yet): one read of at most `tokens`, if it ends the prompt
    tokens: int  # the largest single read (`server.prefill_chunk`)


@dataclass(frozen=True)
class Plan:
    """The prompt reading one step may do."""

    chunk: int  # tokens each prompt may read at once (when neither box below applies): 0 while streams decode
    first: Box | None = None  # a joining prompt's burst
    paced: Box | None = None  # the next read of a prompt that had its burst


class PrefillPacer:
    """Plans each step's prompt reading from the times of the steps before it. Inference thread only."""

    def __init__(self) -> None:
        self._rounds: deque[float] = deque(maxlen=WINDOW)  # seconds of decode rounds that read no prompt
        self.rounds_since_read = GAP_ROUNDS  # decode-only rounds since a step last read a prompt

    @property
    def decode_seconds(self) -> float | None:
        return statistics.median(self._rounds) if self._rounds else None

    def plan(self, limit: int, streams: int, prompts: int) -> Plan:
        """This step's reading, with `streams` decoding and `prompts` being read: everything at
        `limit` a prompt when nobody decodes; else a burst for a joining prompt, and a paced read
        when enough rounds went by without one."""
        if not streams:
            return Plan(limit)
        decode = self.decode_seconds
        first = Box(None if decode is None else BURST_ROUNDS * decode, limit)
        if decode is None or self.rounds_since_read < GAP_ROUNDS:
            return Plan(0, first)
        reads = min(MAX_READS, max(1, prompts // streams))
        return Plan(0, first, Box(reads * READ_ROUNDS * decode, limit))

    def observe(self, seconds: float, decoding: bool, prompt_tokens: int) -> None:
        """What a step took: `seconds`, of which `prompt_tokens` were read."""
        if not decoding:
            return
        if prompt_tokens:
            self.rounds_since_read = 0
            return
        self._rounds.append(seconds)
        self.rounds_since_read += 1
