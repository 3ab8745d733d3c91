"""One sequence's grammar as an mlx-lm logits processor: the tokens it forbids get -inf.

mlx-lm calls a processor once per generated token, as `processor(tokens, logits)`, where the
last of `tokens` is the token sampled at the previous step; the first call (the prompt's) has
nothing to take in. That holds on both decoding paths: `generate_step` (tokens = prompt +
generated) and `BatchGenerator` (each sequence its own processors, tokens = what it was
inserted with + generated, logits one row), so a sequence joining or leaving a batch never
touches another's matcher.

Cost per token: llguidance computes the bitmask in Rust (tens of us at 32k tokens) while MLX
already runs the step's forward pass; the bitmask becomes a boolean row through a 256x8 byte
table (one gather), reused as is while the mask does not change (inside a string, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from llguidance import LLMatcher

_BYTE_BITS = mx.array(((np.arange(256, dtype=np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & 1).astype(np.bool_))


_NEG_INF: dict[mx.Dtype, mx.array] = {}


def _neg_inf(dtype: mx.Dtype) -> mx.array:
    value = _NEG_INF.get(dtype)
    if value is None:
        value = _NEG_INF[dtype] = mx.array(-mx.inf, dtype=dtype)
    return value


class ConstrainedLogits:
    """Masks one sequence's logits to what its grammar allows next; forces EOS once complete.

    Until the grammar is complete, EOS is masked; after, only EOS is allowed. If the matcher
    ever fails (a token it did not allow got sampled anyway), `error` says why and only EOS is
    allowed from then on, so the sequence ends instead of running on unconstrained.
    """

    def __init__(
        self,
        matcher: LLMatcher,
        eos: Sequence[int],
        vocab_size: int,
        *,
        after: Sequence[int] = (),
        opens: int | None = None,
    ) -> None:
        """`after`: constrain only once these tokens were generated (the end of a thinking
        section). With `opens`, that free section is optional: the grammar applies from the
        first token, but that token may also be `opens` (the start of a thinking section),
        which then leaves the output free until `after`."""
        self._matcher = matcher
        self._eos = frozenset(eos)
        self._after = tuple(after)
        self._opens = opens if self._after else None
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        eos_bits = np.zeros(self._words.size * 32, dtype=np.bool_)
        eos_bits[[t for t in self._eos if t < vocab_size]] = True
        self._eos_words = np.packbits(eos_bits, bitorder="little").view(np.int32)
        self._last_key = b""
        self._last_allowed: mx.array | None = None
        self._fresh = True  # the next call brings the prompt (or a resumed sequence's last token)
        self._reset_state()

    def _reset_state(self) -> None:
        self._seen: list[int] = []  # the generated tokens taken in, in order
        self._fed: list[bool] = []  # whether each went to the matcher (not to the `after` gate)
        # index in _seen where the grammar starts
        self._start: int | None = None if self._after and self._opens is None else 0
        self.error: str | None = None

    # -- what the caller reads -------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """The grammar is constraining (the `after` tokens, if any, have been generated)."""
        return self._start is not None

    @property
    def complete(self) -> bool:
        """The output so far is a complete match: ending here gives valid output."""
        return self.active and self.error is None and bool(self._matcher.is_accepting())

    # -- the mlx-lm processor ----------------------------------------------------------------------
    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._fresh:
            self._fresh = False
        else:
            token = cast(int, tokens[-1].item())  # waits for the previous step: the mask needs its token
            if self.active:
                mx.async_eval(logits)  # this step's forward pass runs while the mask is computed
            self._advance(token)
        if not self.active:
            return logits
        return mx.where(self._allowed(logits.shape[-1]), logits, _neg_inf(logits.dtype))

    def resume(self, generated: Sequence[int]) -> None:
        """Align with a sequence that goes on elsewhere: `generated` are its tokens so far.

        For a sequence moved from `generate_step` into a `BatchGenerator`, or rebuilt after a
        failed step: tokens taken in but not in `generated` are rolled back, missing ones are
        taken in, and the next call (whose last token is the last of `generated`, or of the
        prompt) takes nothing in.
        """
        common = 0
        for mine, theirs in zip(self._seen, generated, strict=False):
            if mine != theirs:
                break
            common += 1
        if common < len(self._seen):
            if self.error is not None or self._start is None or common < self._start:
                self._matcher.reset()
                self._reset_state()
                common = 0
            else:
                self._matcher.rollback(sum(self._fed[common:]))
                del self._seen[common:], self._fed[common:]
        for token in generated[common:]:
            self._advance(int(token))
        self._fresh = True

    # -- inside ------------------------------------------------------------------------------------
    def _advance(self, token: int) -> None:
        self._seen.append(token)
        if self._opens is not None and len(self._seen) == 1 and token == self._opens:
            self._start = None  # the model opened its thinking section: free until `after`
        if self._start is None:
            self._fed.append(False)
            if tuple(self._seen[-len(self._after) :]) == self._after:
                self._start = len(self._seen)
            return
        if self.error is not None or (token in self._eos and self._matcher.is_stopped()):
            self._fed.append(False)  # nothing more to match: the end
            return
        self._fed.append(True)
        if not self._matcher.consume_token(token):
            self.error = self._matcher.get_error() or f"token {token} is not allowed here"

    def _allowed(self, width: int) -> mx.array:
        """A boolean row of `width` entries: True where the grammar allows the token."""
        words = self._words
        if self.error is None:
            self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if self._matcher.is_error():
                self.error = self._matcher.get_error()
        if self.error is not None or not words.any():  # never an all -inf row: that samples garbage
            words = self._eos_words
        elif self._opens is not None and not self._seen and self._opens < words.size * 32:
            words = words.copy()  # the first token may also open the thinking section
            words.view(np.uint32)[self._opens // 32] |= np.uint32(1 << (self._opens % 32))
        key = words.tobytes()
        if key == self._last_key and self._last_allowed is not None and self._last_allowed.shape[0] == width:
            return self._last_allowed
        allowed = _BYTE_BITS[mx.array(words.view(np.uint8))].reshape(-1)
        if width <= allowed.shape[0]:
            allowed = allowed[:width]
        else:  # the model has more rows than the tokenizer has tokens: those never come out
            allowed = mx.concatenate([allowed, mx.zeros((width - allowed.shape[0],), dtype=mx.bool_)])
        self._last_key, self._last_allowed = key, allowed
        return allowed
