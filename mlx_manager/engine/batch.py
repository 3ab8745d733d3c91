"""The running generations of one model: one alone on mlx-lm's single-sequence loop, several
together in its `BatchGenerator` (continuous batching: a new job joins at the next step).

A job's prompt starts from the longest prefix the model's prompt cache has; the rest is
prefilled in chunks (a step reads at most the chunk the worker gives it, see `pacing.py`), so a
long prompt never holds up the other streams for long and a cancelled job stops within one
chunk. When a job ends, its state goes back into the prompt cache for the next turn of its
conversation. The choices of one request (`n` > 1) read their prompt once (`Prefill`),
then each decodes from a copy of its cache.

Everything here runs on the inference thread.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from mlx_manager.engine.errors import GenerationFailed
from mlx_manager.engine.jobs import Job
from mlx_manager.engine.logits import token_logprob, token_texts
from mlx_manager.engine.output import Output
from mlx_manager.engine.pacing import Box, Plan
from mlx_manager.engine.pool import LoadedModel
from mlx_manager.engine.prompt_cache import PromptCache
from mlx_manager.engine.types import Finished, Logprobs

FIRST_READ = 16  # a prompt's first timed read, in tokens; each next one in a box may double


@dataclass
class Slot:
    """A job inside a batch."""

    job: Job
    output: Output
    tokens: list[int]  # the prompt, then every token generated: enough to rebuild its cache
    sampler: Any
    processors: list[Any]  # logits processors (penalties, a constraint's), the job's own
    max_tokens: int  # the request's, or what the context leaves of the default
    cached: int = 0  # prompt tokens restored from the prompt cache
    uid: int = -1

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens) - self.job.completion_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.job.completion_tokens

    def resume_processors(self) -> None:
        """Tell the processors where the job is, before it goes on in another batch."""
        generated = self.tokens[self.prompt_tokens :]
        for processor in self.processors:
            processor.resume(generated)


class Solo:
    """A lone job: its prompt prefilled a chunk per step, then mlx-lm's single-sequence loop
    (`generate_step`), which has no batching overhead."""

    def __init__(
        self, entry: LoadedModel, slot: Slot, cache: list[Any] | None, held: list[int], rest: list[int]
    ) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.entry = entry
        self.slot = slot
        self.cache = cache if cache is not None else make_prompt_cache(entry.model)
        self.held = list(held)  # the tokens the cache holds
        self.rest = list(rest)  # prompt tokens still to prefill (at least one)
        self.steps: Any = None
        self.last_token: int | None = None
        self.last_logprobs: Any = None  # the distribution the last token was drawn from

    @property
    def decoding(self) -> bool:
        return self.steps is not None

    def advance(self, chunk: int) -> tuple[int | None, int]:
        """One step of work: (None, tokens read) for a chunk of the prompt (at most `chunk`
        tokens), or (the next token, prompt tokens read on the way)."""
        import mlx.core as mx

        if self.steps is None:
            if len(self.rest) > chunk:
                if chunk <= 0:
                    return None, 0
                part, self.rest = self.rest[:chunk], self.rest[chunk:]
                read_chunk(self.entry, self.cache, part)
                self.held += part
                return None, len(part)
            from mlx_lm.generate import generate_step

            self.steps = generate_step(
                mx.array(self.rest),
                self.entry.model,
                max_tokens=self.slot.remaining,
                sampler=self.slot.sampler,
                logits_processors=self.slot.processors or None,
                prompt_cache=self.cache,
            )
            read = len(self.rest)
            self.held += self.rest
            self.rest = []
        else:
            read = 0
        token, self.last_logprobs = next(self.steps)
        # generate_step feeds each token to the model before it yields it (it runs one step
        # ahead), so the cache now holds this token too.
        self.last_token = int(token)
        self.held.append(self.last_token)
        return self.last_token, read

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()

    def hand_over(self) -> tuple[list[int], list[Any] | None, list[int]]:
        """What a BatchGenerator needs to continue this job: the prompt still to feed, the cache
        before it, and the tokens that cache holds.

        A job already generating gives its last token again as the prompt (the cache is trimmed
        by one: generate_step had fed it already); one still prefilling hands over the rest of
        its prompt."""
        self.close()
        if self.last_token is None:  # still reading its prompt
            return self.rest, self.cache if self.held else None, self.held
        for layer in self.cache:
            layer.trim(1)
        return [self.last_token], self.cache, self.held[:-1]


def read_chunk(entry: LoadedModel, cache: list[Any], chunk: list[int]) -> None:
    """Prefill `chunk` into `cache` (the logits are not needed: more of the prompt follows)."""
    import mlx.core as mx

    entry.model(mx.array(chunk)[None], cache=cache)
    mx.eval([layer.state for layer in cache])


class Prefill:
    """A job joining the batch (or the choices of one request, `n` > 1) reads its prompt here,
    up to its last token (a burst, then paced reads, while others decode: see `pacing.py`; a chunk
    a step when nobody does); then each slot joins
    the generator with a cache (a copy per choice) and the last token as its prompt, so only
    that token is computed there."""

    def __init__(
        self,
        entry: LoadedModel,
        slots: list[Slot],
        cache: list[Any] | None,
        held: list[int],
        rest: list[int],
        *,
        bursted: bool = False,
    ) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.entry = entry
        self.slots = slots
        self.cache = cache if cache is not None else make_prompt_cache(entry.model)
        self.held = list(held)
        self.rest = list(rest)  # at least one token: the last is each choice's own
        self.bursted = bursted  # had its burst (or needs none: it was read at the full chunk)
        self.per_token: float | None = None  # seconds a token of its last timed read took

    @property
    def left(self) -> int:
        return len(self.rest) - 1

    def advance(self, chunk: int) -> int:
        """Read up to `chunk` tokens of the prompt (never its last); how many were read."""
        size = max(0, min(chunk, self.left))
        if size:
            part, self.rest = self.rest[:size], self.rest[size:]
            read_chunk(self.entry, self.cache, part)
            self.held += part
        return size

    def read_for(self, box: Box, per_token: float | None = None) -> int:
        """Read alone for up to `box.seconds`, in reads that grow while the next (sized from the
        last one's time) still fits; how many tokens were read. The first read is sized from this
        prompt's previous one; for its first, from `per_token` (the model's last timed read, any
        prompt's: half the box's worth, as this prompt may sit at a longer context), or
        FIRST_READ tokens. (A conversation's next turn, a few dozen tokens, is then one read:
        each read goes through the whole KV cache once, however few tokens it has.)

        Without a time box (no decode round timed yet), one read of at most `box.tokens`, and only
        if that finishes the prompt."""
        self.bursted = True
        if box.seconds is None:
            return self.advance(box.tokens) if self.left <= box.tokens else 0
        started = time.perf_counter()
        if self.per_token is not None:
            size = int(box.seconds / self.per_token)
        else:
            size = FIRST_READ if per_token is None else int(box.seconds / 2 / per_token)
        size, read = max(1, min(size, box.tokens)), 0
        while self.left and size > 0:
            before = time.perf_counter()
            done = self.advance(size)
            read += done
            now = time.perf_counter()
            self.per_token = (now - before) / done
            room = box.seconds - (now - started)
            size = min(2 * size, box.tokens, int(room / self.per_token))
        return read

    @property
    def read(self) -> bool:
        """Only the last token is left: each choice may join the batch."""
        return self.left <= 0

    def caches(self) -> list[list[Any] | None]:
        """One cache per choice: the first gets the prefilled one, the others copies (None when
        nothing was prefilled: each starts from its prompt)."""
        if not self.held:
            return [None] * len(self.slots)
        caches: list[list[Any] | None] = [self.cache]
        return caches + [copy.deepcopy(self.cache) for _ in self.slots[1:]]


class ModelBatch:
    """The running jobs of one model: one alone on the fast path, several in a BatchGenerator."""

    def __init__(self, entry: LoadedModel, max_batch_size: int, prompt_cache: PromptCache, prefill_chunk: int) -> None:
        self.entry = entry
        self.max_batch_size = max_batch_size
        self.prompt_cache = prompt_cache
        self.prefill_chunk = prefill_chunk  # the generator's (it only ever gets a job's last token: see Prefill)
        self.eos = entry.tokenizer.eos_token_ids
        self.generator: Any = None
        self.solo: Solo | None = None
        self.slots: dict[int, Slot] = {}
        self.fresh: set[int] = set()  # joined, no token yet: the suspects if a step fails
        self.prefills: list[Prefill] = []  # groups of choices still reading their prompt
        self.per_token: float | None = None  # seconds a prompt token took in the last timed read (any prompt's)
        self._solo_uid = -1
        self._waiting_uid = -1  # the keys of slots in a Prefill: -2, -3, ...

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def streams(self) -> int:
        """The jobs here past their prompt."""
        if self.solo is not None:
            return int(self.solo.decoding)
        return len(self.slots) - len(self.fresh)

    def add(self, slot: Slot, tokens: list[int]) -> None:
        if not self.slots and self.generator is None:
            cache, cached = self.prompt_cache.fetch(tokens)
            slot.cached = cached
            slot.uid = self._solo_uid
            self.solo = Solo(self.entry, slot, cache, tokens[:cached], tokens[cached:])
            self.slots[slot.uid] = slot
            self.fresh.add(slot.uid)
        else:
            self.add_choices([slot], tokens)

    def add_choices(self, slots: list[Slot], tokens: list[int]) -> None:
        """A job joining the batch, or the choices of one request: one prompt (`tokens`), read
        once for all of them (see `Prefill`)."""
        cache, cached = self.prompt_cache.fetch(tokens)
        if self.solo is not None:
            self._move_solo_to_batch()
        self._wait(slots, Prefill(self.entry, slots, cache, tokens[:cached], tokens[cached:]))
        for slot in slots:
            slot.cached = cached

    def _wait(self, slots: list[Slot], prefill: Prefill) -> None:
        for slot in slots:
            self._waiting_uid -= 1
            slot.uid = self._waiting_uid
            self.slots[slot.uid] = slot
            self.fresh.add(slot.uid)
        self.prefills.append(prefill)

    def _advance_prefills(self, plan: Plan) -> int:
        """Read prompts: the shortest that has not had its burst gets it, alone; else, when the
        plan has a paced read, the shortest prompt gets that; else `plan.chunk` tokens of each
        (nobody decoding). A prompt that is read joins the generator, one sequence per choice,
        each with its own copy of the cache. Returns the tokens read."""
        waiting = [prefill for prefill in self.prefills if not prefill.bursted]
        box, readers = (plan.first, waiting) if plan.first is not None and waiting else (plan.paced, self.prefills)
        if box is not None and readers:
            reader = min(readers, key=lambda prefill: prefill.left)
            read = reader.read_for(box, self.per_token)
            self.per_token = reader.per_token or self.per_token
        else:
            read = sum(prefill.advance(plan.chunk) for prefill in self.prefills)
        for prefill in list(self.prefills):
            if not prefill.read:
                continue
            self.prefills.remove(prefill)
            for slot, cache in zip(prefill.slots, prefill.caches(), strict=True):
                self.slots.pop(slot.uid, None)
                self.fresh.discard(slot.uid)
                prompt, held = (prefill.rest, prefill.held) if cache is not None else (prefill.held + prefill.rest, [])
                slot.uid = self._insert(slot, list(prompt), cache, list(held))
                self.slots[slot.uid] = slot
                self.fresh.add(slot.uid)
        return read

    def _insert(self, slot: Slot, prompt: list[int], cache: list[Any] | None, held: list[int]) -> int:
        generator = self._batch()
        if self._by_sequence():  # a cache of its own in the batch (its prompt is one token: see Prefill)
            from mlx_lm.models.cache import make_prompt_cache

            from mlx_manager.engine.sequence_caches import SequenceCache

            cache = [SequenceCache.adopt(layer) for layer in cache or make_prompt_cache(self.entry.model)]
        (uid,) = generator.insert(
            [prompt],
            max_tokens=[slot.remaining],
            caches=[cache] if cache is not None else None,
            all_tokens=[list(held)],
            samplers=[slot.sampler],
            logits_processors=[slot.processors],
        )
        return int(uid)

    def _by_sequence(self) -> bool:
        """Whether this model's batches keep a cache per sequence (engine/sequence_caches.py)."""
        if self.entry.by_sequence is None:
            from mlx_manager.engine.sequence_caches import batches_by_sequence

            self.entry.by_sequence = batches_by_sequence(self.entry.model)
        return self.entry.by_sequence

    def _batch(self) -> Any:
        if self.generator is None:
            from mlx_lm.generate import BatchGenerator

            self.generator = BatchGenerator(
                self.entry.model,
                stop_tokens=[[t] for t in self.eos],
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=min(8, self.max_batch_size),
                prefill_step_size=self.prefill_chunk,
            )
        return self.generator

    def _move_solo_to_batch(self) -> None:
        solo, self.solo = self.solo, None
        assert solo is not None
        slot = self.slots.pop(solo.slot.uid)
        self.fresh.discard(slot.uid)
        prompt, cache, held = solo.hand_over()
        if solo.last_token is None:  # still reading its prompt (at the full chunk): nobody waits for its tokens yet
            self._wait([slot], Prefill(self.entry, [slot], cache, held, prompt, bursted=True))
            return
        slot.resume_processors()
        slot.uid = self._insert(slot, prompt, cache, held)
        self.slots[slot.uid] = slot

    def remove(self, uid: int, *, keep_cache: bool = False) -> Slot | None:
        """Take a job out; with `keep_cache`, its state goes into the prompt cache."""
        slot = self.slots.pop(uid, None)
        if slot is None:
            return None
        self.fresh.discard(uid)
        prefill = next((p for p in self.prefills if slot in p.slots), None)
        if prefill is not None:  # still reading its prompt: not in the generator yet
            prefill.slots.remove(slot)
            if not prefill.slots:
                self.prefills.remove(prefill)
        elif self.solo is not None and self.solo.slot is slot:
            solo, self.solo = self.solo, None
            solo.close()
            if keep_cache and solo.steps is not None:
                self.prompt_cache.store(solo.held, solo.cache)
        elif self.generator is not None:
            extracted = self.generator.remove([uid], return_prompt_caches=keep_cache)
            if keep_cache and uid in extracted:
                cache, held = extracted[uid]
                self.prompt_cache.store(list(held), cache)
        return slot

    def step(self, plan: Plan) -> tuple[list[Slot], int]:
        """One step for every job: a decode step for those generating, and the prompt reading
        `plan` allows (see `_advance_prefills`). Returns the slots that finished and how many
        prompt tokens were read."""
        if self.solo is not None:
            slot = self.solo.slot
            token, read = self.solo.advance(plan.chunk)
            if token is None:  # still reading the prompt
                return [], read
            reason = "stop" if token in self.eos else None
            if reason is None and slot.job.completion_tokens + 1 >= slot.max_tokens:
                reason = "length"
            finished = [slot] if self._deliver(slot, token, reason, self.solo.last_logprobs) else []
            if finished:
                self.remove(slot.uid, keep_cache=True)
            return finished, read
        read = self._advance_prefills(plan)
        if self.generator is None:
            return [], read
        with self.generator.stats() as stats:
            _, responses = self.generator.next()
        finished = []
        for r in responses:
            found = self.slots.get(r.uid)
            if found is None or not self._deliver(found, r.token, r.finish_reason, r.logprobs):
                continue
            finished.append(found)
            if r.finish_reason is not None:  # mlx-lm let go of it, and handed its state over
                self.slots.pop(found.uid, None)
                self.fresh.discard(found.uid)
                self.prompt_cache.store(list(r.all_tokens), r.prompt_cache)
            else:  # a stop string, or the one tool call it was allowed: ours to remove
                self.remove(found.uid, keep_cache=True)
        return finished, read + stats.prompt_tokens

    def _deliver(self, slot: Slot, token: int, reason: str | None, logprobs: Any) -> bool:
        """Send what this token completes; True when the job is over."""
        self.fresh.discard(slot.uid)
        job, output = slot.job, slot.output
        if reason == "stop":  # an end-of-sequence token: not part of the text
            pieces = output.finish()
        else:
            job.completion_tokens += 1
            slot.tokens.append(token)
            if job.request.logprobs is not None and logprobs is not None:
                texts = token_texts(self.entry.tokenizer)
                job.emit(Logprobs((token_logprob(logprobs, token, job.request.logprobs, texts),)))
            pieces = output.add(token)
            if reason == "length" and not output.stopped:
                pieces += output.finish()
        for piece in pieces:
            job.emit(piece)
        if output.stopped:
            reason = "stop"
        if reason is None:
            return False
        broken = next((p.error for p in slot.processors if getattr(p, "error", None)), None)
        if broken is not None:  # never pass off output that left its grammar as a valid answer
            job.emit(GenerationFailed("the output left its grammar (the grammar engine and the tokenizer disagree)"))
            return True
        finish_reason = "tool_calls" if reason == "stop" and output.calls else reason
        job.emit(
            Finished(
                finish_reason,  # type: ignore[arg-type]
                slot.prompt_tokens,
                job.completion_tokens,
                reasoning_tokens=output.reasoning_tokens,
                cached_tokens=slot.cached,
                stop_sequence=output.text.matched,
            )
        )
        return True

    def recover(self) -> list[Slot]:
        """After a failed step: drop the jobs that had no token yet (the suspects) and return them.

        The BatchGenerator's state cannot be trusted after an exception, so the survivors read
        their prompt plus the tokens they already produced again (as a `Prefill`, paced like any
        prompt) and then join a new one; they carry on from where they were.
        """
        suspects = self.fresh or set(self.slots)
        failed = [self.slots[uid] for uid in suspects]
        survivors = [slot for uid, slot in self.slots.items() if uid not in suspects]
        self.close()
        self.generator, self.slots, self.fresh, self.prefills = None, {}, set(), []
        for slot in survivors:
            slot.resume_processors()
            self._wait([slot], Prefill(self.entry, [slot], None, [], list(slot.tokens)))
        return failed

    def close(self) -> None:
        self.prefills = []
        if self.solo is not None:
            self.solo.close()
            self.solo = None
        if self.generator is not None:
            self.generator.close()
