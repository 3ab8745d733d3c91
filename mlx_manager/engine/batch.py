"""The running generations of one model: one alone on mlx-lm's single-sequence loop, several
together in its `BatchGenerator` (continuous batching: a new job joins at the next step).

Everything here runs on the inference thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_manager.engine.jobs import Job
from mlx_manager.engine.output import Output
from mlx_manager.engine.pool import LoadedModel
from mlx_manager.engine.types import Finished


@dataclass
class Slot:
    """A job inside a batch."""

    job: Job
    output: Output
    tokens: list[int]  # the prompt, then every token generated: enough to rebuild its cache
    sampler: Any
    uid: int = -1

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens) - self.job.completion_tokens


class Solo:
    """A lone job on mlx-lm's single-sequence loop (`generate_step`): no batching overhead."""

    def __init__(self, entry: LoadedModel, slot: Slot, tokens: list[int]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        self.slot = slot
        self.prompt = tokens
        self.cache = make_prompt_cache(entry.model)
        self.last_token: int | None = None
        self.steps = generate_step(
            mx.array(tokens),
            entry.model,
            max_tokens=slot.job.request.max_tokens,
            sampler=slot.sampler,
            prompt_cache=self.cache,
        )

    def next_token(self) -> int:
        token, _ = next(self.steps)
        self.last_token = int(token)
        return self.last_token

    def hand_over(self) -> tuple[list[int], list[Any] | None]:
        """What a BatchGenerator needs to continue this job: a prompt and the cache before it.

        generate_step has already fed the last token to the model (its next step runs ahead),
        so the cache is trimmed by one and the token is given again as the new prompt. A job
        that has not stepped yet simply starts over from its prompt.
        """
        self.steps.close()
        if self.last_token is None:
            return self.prompt, None
        for layer in self.cache:
            layer.trim(1)
        return [self.last_token], self.cache


class ModelBatch:
    """The running jobs of one model: one alone on the fast path, several in a BatchGenerator."""

    def __init__(self, entry: LoadedModel, max_batch_size: int) -> None:
        self.entry = entry
        self.max_batch_size = max_batch_size
        self.eos = entry.tokenizer.eos_token_ids
        self.generator = None
        self.solo: Solo | None = None
        self.slots: dict[int, Slot] = {}
        self.fresh: set[int] = set()  # joined, no token yet: the suspects if a step fails
        self._solo_uid = -1

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, slot: Slot, tokens: list[int]) -> None:
        if not self.slots and self.generator is None:
            slot.uid = self._solo_uid
            self.solo = Solo(self.entry, slot, tokens)
        else:
            if self.solo is not None:
                self._move_solo_to_batch()
            (slot.uid,) = self._batch().insert([tokens], max_tokens=[slot.job.request.max_tokens], samplers=[slot.sampler])
        self.slots[slot.uid] = slot
        self.fresh.add(slot.uid)

    def _batch(self):
        if self.generator is None:
            from mlx_lm.generate import BatchGenerator

            self.generator = BatchGenerator(
                self.entry.model,
                stop_tokens=[[t] for t in self.eos],
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=min(8, self.max_batch_size),
            )
        return self.generator

    def _move_solo_to_batch(self) -> None:
        solo, self.solo = self.solo, None
        slot = self.slots.pop(solo.slot.uid)
        self.fresh.discard(slot.uid)
        prompt, cache = solo.hand_over()
        remaining = slot.job.request.max_tokens - slot.job.completion_tokens
        (slot.uid,) = self._batch().insert(
            [prompt], max_tokens=[remaining], caches=[cache] if cache else None, samplers=[slot.sampler]
        )
        self.slots[slot.uid] = slot

    def remove(self, uid: int) -> Slot | None:
        slot = self.slots.pop(uid, None)
        if slot is None:
            return None
        self.fresh.discard(uid)
        if self.solo is not None and self.solo.slot is slot:
            self.solo.steps.close()
            self.solo = None
        elif self.generator is not None:
            self.generator.remove([uid])
        return slot

    def step(self) -> list[Slot]:
        """One decode step for every job; returns the slots that finished."""
        if self.solo is not None:
            slot = self.solo.slot
            token = self.solo.next_token()
            reason = "stop" if token in self.eos else None
            if reason is None and slot.job.completion_tokens + 1 >= slot.job.request.max_tokens:
                reason = "length"
            finished = [slot] if self._deliver(slot, token, reason) else []
            if finished:
                self.remove(slot.uid)
            return finished
        _, responses = self.generator.next()
        finished = [
            slot
            for r in responses
            if (slot := self.slots.get(r.uid)) is not None and self._deliver(slot, r.token, r.finish_reason)
        ]
        for slot in finished:
            # mlx-lm dropped the ones it finished; a stop string is ours to remove.
            self.remove(slot.uid) if slot.output.stopped else self.slots.pop(slot.uid, None)
        return finished

    def _deliver(self, slot: Slot, token: int, reason: str | None) -> bool:
        """Send what this token completes; True when the job is over."""
        self.fresh.discard(slot.uid)
        job, output = slot.job, slot.output
        if reason == "stop":  # an end-of-sequence token: not part of the text
            pieces = output.finish()
        else:
            job.completion_tokens += 1
            slot.tokens.append(token)
            pieces = output.add(token)
            if reason == "length" and not output.stopped:
                pieces += output.finish()
        for piece in pieces:
            job.emit(piece)
        if output.stopped:
            reason = "stop"
        if reason is None:
            return False
        finish_reason = "tool_calls" if reason == "stop" and output.calls else reason
        finished = Finished(
            finish_reason,  # type: ignore[arg-type]
            slot.prompt_tokens,
            job.completion_tokens,
            output.reasoning_tokens,
            stop_sequence=output.text.matched,
        )
        job.emit(finished)
        return True

    def recover(self) -> list[Slot]:
        """After a failed step: drop the jobs that had no token yet (the suspects) and return them.

        The BatchGenerator's state cannot be trusted after an exception, so the survivors go
        into a new one, their caches rebuilt from their prompt plus the tokens they already
        produced; they carry on from where they were.
        """
        suspects = self.fresh or set(self.slots)
        failed = [self.slots[uid] for uid in suspects]
        survivors = [slot for uid, slot in self.slots.items() if uid not in suspects]
        self.close()
        self.generator, self.slots, self.fresh = None, {}, set()
        for slot in survivors:
            remaining = slot.job.request.max_tokens - slot.job.completion_tokens
            (slot.uid,) = self._batch().insert([list(slot.tokens)], max_tokens=[remaining], samplers=[slot.sampler])
            self.slots[slot.uid] = slot
        return failed

    def close(self) -> None:
        if self.solo is not None:
            self.solo.steps.close()
            self.solo = None
        if self.generator is not None:
            self.generator.close()
