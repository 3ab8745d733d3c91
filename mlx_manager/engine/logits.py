"""Per-sequence logits processors for OpenAI's penalties and `logit_bias`, and the log
probabilities a job reports of the tokens it generated.

Processors follow mlx-lm's protocol (`processor(tokens, logits)`, called once per generated token,
`tokens[-1]` the token sampled at the step before; the first call, the prompt's, takes nothing in)
on both decoding paths, `generate_step` and `BatchGenerator`, and the constraint's `resume()`
protocol, so a sequence that moves into a batch or is rebuilt after a failed step carries its
counts along. Counting stays in MLX (no `.item()`), so a penalty never waits for the step's
tokens: it is one more lazy operation in the step's graph.

Log probabilities are those mlx-lm computes: the log-softmax of the logits *after* every
processor (penalties, bias, a grammar's mask), before temperature and top-p / top-k / min-p.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mlx_manager.engine.types import Penalties, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    import mlx.core as mx

# mlx.core is imported inside each function, never here: the engine's modules are imported before
# engine/blas.py loads the optimised BLAS, and MLX bound to its bundled one first would keep it.

# OpenAI's stand-in for a token the model cannot produce (a grammar masked it): JSON has no -inf.
IMPOSSIBLE = -9999.0


class PenaltyProcessor:
    """OpenAI's `frequency_penalty` and `presence_penalty` over the tokens this sequence generated
    (never the prompt's), and `logit_bias` added to the logits:

        logit[j] -= count[j] * frequency + (count[j] > 0) * presence - bias[j]
    """

    def __init__(self, vocab_size: int, frequency: float, presence: float, bias: Mapping[int, float]) -> None:
        import mlx.core as mx

        self.vocab_size = vocab_size
        self.frequency = frequency
        self.presence = presence
        self._counts = mx.zeros((vocab_size,), dtype=mx.float32)
        self._bias: mx.array | None = None
        if bias:
            row = [0.0] * vocab_size
            for token, value in bias.items():
                row[token] = value
            self._bias = mx.array(row, dtype=mx.float32)
        self._fresh = True

    @property
    def counting(self) -> bool:
        return bool(self.frequency or self.presence)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import mlx.core as mx

        if self._fresh:
            self._fresh = False
        elif self.counting:
            self._counts = self._counts.at[tokens[-1:].astype(mx.int32)].add(1.0)
        adjustment = self._adjustment()
        if adjustment is None:
            return logits
        width = logits.shape[-1]
        if width != self.vocab_size:  # the model has more (or fewer) rows than the tokenizer has tokens
            adjustment = _fit(adjustment, width)
        return logits + adjustment.astype(logits.dtype)

    def _adjustment(self) -> mx.array | None:
        import mlx.core as mx

        parts = []
        if self.frequency:
            parts.append(-self.frequency * self._counts)
        if self.presence:
            parts.append(-self.presence * (self._counts > 0).astype(mx.float32))
        if self._bias is not None:
            parts.append(self._bias)
        if not parts:
            return None
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def resume(self, generated: Sequence[int]) -> None:
        """Counts from `generated`, for a sequence that goes on elsewhere; the next call takes nothing in."""
        import mlx.core as mx

        counts = [0.0] * self.vocab_size
        for token in generated:
            if 0 <= token < self.vocab_size:
                counts[token] += 1.0
        self._counts = mx.array(counts, dtype=mx.float32)
        self._fresh = True


class RepetitionPenalty:
    """mlx-lm's `repetition_penalty` (an extension, not OpenAI's): the logit of a token among the
    last `context_size` tokens, prompt included, is divided by the penalty (multiplied, if
    negative). It keeps its own window of tokens: what mlx-lm passes depends on the decoding path
    and on how much of the prompt came from the prompt cache."""

    def __init__(self, penalty: float, prompt: Sequence[int], context_size: int = 20) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_repetition_penalty

        self.penalty = penalty
        self.context_size = context_size
        self._prompt = list(prompt[-context_size:])
        self._window = mx.array(self._prompt, dtype=mx.int32)
        self._apply = make_repetition_penalty(penalty, context_size)
        self._fresh = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import mlx.core as mx

        if self._fresh:
            self._fresh = False
        else:
            self._window = mx.concatenate([self._window, tokens[-1:].astype(mx.int32)])[-self.context_size :]
        return self._apply(self._window, logits)

    def resume(self, generated: Sequence[int]) -> None:
        import mlx.core as mx

        window = [*self._prompt, *generated][-self.context_size :]
        self._window = mx.array(window, dtype=mx.int32)
        self._fresh = True


def _fit(row: mx.array, width: int) -> mx.array:
    import mlx.core as mx

    if row.shape[0] >= width:
        return row[:width]
    return mx.concatenate([row, mx.zeros((width - row.shape[0],), dtype=row.dtype)])


def penalty_processors(penalties: Penalties, vocab_size: int, prompt: Sequence[int]) -> list[Any]:
    """The processors a job's penalties need (none for the defaults)."""
    processors: list[Any] = []
    if penalties.frequency or penalties.presence or penalties.logit_bias:
        processors.append(PenaltyProcessor(vocab_size, penalties.frequency, penalties.presence, penalties.logit_bias))
    if penalties.repetition is not None and penalties.repetition != 1.0:
        processors.append(RepetitionPenalty(penalties.repetition, prompt))
    return processors


# -- log probabilities -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTexts:
    """Each token id's bytes as the model writes them, from the tokenizer's own detokenizer table."""

    table: Any  # BPE: the byte-level strings; SPM: bytes; None: decode one by one
    kind: str  # "bpe", "spm" or "naive"
    tokenizer: Any

    def bytes_of(self, token: int) -> bytes:
        if self.kind == "bpe" and token < len(self.table):
            from mlx_lm.tokenizer_utils import _byte_decoder

            decoder = _byte_decoder()
            out = bytearray()
            for char in self.table[token]:
                value = decoder.get(char)
                if value is None:
                    out.extend(char.encode("utf-8"))
                else:
                    out.append(value)
            return bytes(out)
        if self.kind == "spm" and token < len(self.table):
            return bytes(self.table[token]).replace("\u2581".encode(), b" ")
        return str(self.tokenizer.decode([token])).encode("utf-8")


_texts: weakref.WeakKeyDictionary[Any, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> TokenTexts:
    """The byte table of an mlx-lm TokenizerWrapper, made once per tokenizer."""
    texts = _texts.get(tokenizer)
    if texts is None:
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

        prototype = getattr(tokenizer, "_detokenizer", None)
        if isinstance(prototype, BPEStreamingDetokenizer):
            texts = TokenTexts(prototype.tokenmap, "bpe", tokenizer)
        elif isinstance(prototype, SPMStreamingDetokenizer):
            texts = TokenTexts(prototype.tokenmap, "spm", tokenizer)
        else:
            texts = TokenTexts(None, "naive", tokenizer)
        _texts[tokenizer] = texts
    return texts


def _text(data: bytes) -> str:
    """A token's text; bytes that are not whole UTF-8 characters are written as \\xNN escapes."""
    return data.decode("utf-8", errors="backslashreplace")


def _value(logprob: float) -> float:
    return logprob if logprob > IMPOSSIBLE else IMPOSSIBLE


def token_logprob(logprobs: mx.array, token: int, top: int, texts: TokenTexts) -> TokenLogprob:
    """The sampled token's log probability and the `top` most likely tokens at its step."""
    import mlx.core as mx

    row = logprobs.reshape(-1).astype(mx.float32)
    chosen = float(cast(float, row[token].item()))
    best: tuple[TopLogprob, ...] = ()
    if top > 0:
        count = min(top, row.shape[0])
        ids = mx.argpartition(-row, kth=count - 1)[:count]
        values = row[ids]
        order = mx.argsort(-values)
        pairs = zip(cast(list[int], ids[order].tolist()), cast(list[float], values[order].tolist()), strict=True)
        best = tuple(TopLogprob(_text(data := texts.bytes_of(i)), data, _value(v)) for i, v in pairs)
    data = texts.bytes_of(token)
    return TokenLogprob(_text(data), data, _value(chosen), best)
