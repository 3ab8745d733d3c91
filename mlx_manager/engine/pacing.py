"""How many prompt tokens a step may read while other streams are decoding.

Every step of the inference thread is one decode round for the running streams plus a chunk of
whatever prompts are being read. A fixed chunk (`server.prefill_chunk`) would make each of those
rounds as slow as reading the chunk: on a CPU, 512 tokens cost tens of decode rounds, so a long
prompt arriving would stall every running stream for its whole prefill. While streams decode,
the chunk is therefore sized by time: reading it should take at most `SHARE` of a decode round,
so their inter-token latency grows to about 1.75x while the prompt is read (never less than one
token a step: where a single token costs more, as with a tiny model whose steps are mostly fixed
cost, that is what they pay). With nobody decoding, a prompt is read at the full `prefill_chunk`.

The decode round is timed on rounds that read no prompt; while prompts are read without pause,
one round in every `REMEASURE_SECONDS` reads nothing, to time it again. The chunk follows the
measured cost per token of recent chunks, so it fits whatever the model, the context length, the
batch and the machine's load make a token cost.

Pacing spreads the running streams' delay over many steps; it does not shrink it, and it
multiplies the newcomer's wait. So a prompt joining the batch first gets one *burst*: it is read
alone for up to `BURST_ROUNDS` decode rounds (timed as it goes, in reads that grow while they
fit), which is all of it for a conversation's next turn (its history is in the prompt cache);
only what is left after the burst is paced. Each of the running streams waits that once, for a
bounded time. Bursts go to the shortest prompt first, one a step, so prompts that arrive
together start one after another instead of all at the end.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

# A step's prompt work, as a share of one decode round: running streams' inter-token latency
# grows by at most this much while a prompt is read (the bound is 2x; this leaves room for noise).
SHARE = 0.75
MIN_CHUNK = 1  # a prompt always makes some progress, however dear its tokens are
REMEASURE_SECONDS = 2.0
# Estimates are medians of this many recent steps: one step slowed by the machine (another
# process, a page fault) must not swing the chunk.
WINDOW = 7
# A joining prompt's burst may take this many decode rounds: the one long gap it costs each
# running stream (mlx_lm.server and llama.cpp read a whole prompt chunk in one go, unbounded).
BURST_ROUNDS = 32


@dataclass(frozen=True)
class Burst:
    """How long one prompt may be read alone this step."""

    seconds: float | None  # the time box; None (no decode round timed yet): one read of at most `tokens`
    tokens: int  # the largest single read


class PrefillPacer:
    """The chunk size for the next step, from the times of the steps before it. Inference thread only."""

    def __init__(self) -> None:
        self._rounds: deque[float] = deque(maxlen=WINDOW)  # seconds of decode rounds that read no prompt
        self._token_costs: deque[float] = deque(maxlen=WINDOW)  # seconds per prompt token on top of a round
        self.measured_at = float("-inf")  # when a decode round was last timed alone (perf_counter)

    @property
    def decode_seconds(self) -> float | None:
        return statistics.median(self._rounds) if self._rounds else None

    def chunk(self, limit: int, decoding: bool, now: float) -> int:
        """Prompt tokens each prompt may read this step; 0 makes it a decode-only round, to time one."""
        if not decoding:
            return limit
        decode = self.decode_seconds
        if decode is None or now - self.measured_at > REMEASURE_SECONDS:
            return 0
        if not self._token_costs:
            return min(limit, MIN_CHUNK)
        return max(MIN_CHUNK, min(limit, int(SHARE * decode / statistics.median(self._token_costs))))

    def burst(self, limit: int, chunk: int) -> Burst | None:
        """The burst a joining prompt may have this step; None on a round kept to time decoding."""
        if chunk == 0:
            return None
        decode = self.decode_seconds
        return Burst(None if decode is None else BURST_ROUNDS * decode, limit)

    def observe(self, seconds: float, decoding: bool, chunk: int, prompt_tokens: int, now: float) -> None:
        """What the step took: `seconds` for its decode round and `prompt_tokens` read at `chunk` a prompt."""
        if not decoding:
            return
        if prompt_tokens == 0:
            self._rounds.append(seconds)
            self.measured_at = now
            return
        decode = self.decode_seconds
        if decode is None or chunk <= 0:
            return
        # Per token of the chunk: a fixed cost per step makes small chunks look dear, and the
        # chunk then grows until the step's prompt work fits the share.
        self._token_costs.append(max(seconds - decode, 1e-6) / chunk)
