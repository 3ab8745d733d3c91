"""The inference thread: the one place MLX runs.

It takes commands (submit, cancel, load, reconfigure, stop) from the engine's queue, keeps
one mlx-lm `BatchGenerator` per model with active jobs (continuous batching: a new job joins
at the next step), advances every batch one decode step per loop, and sends each job its
text deltas. A cancelled job is removed from its batch before the next step.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.engine.embedding import EmbeddingQueue, result_of
from mlx_manager.engine.errors import (
    ChatTemplateMissing,
    EngineError,
    EngineStopped,
    GenerationFailed,
    InvalidRequest,
    WrongModelKind,
)
from mlx_manager.engine.pool import LoadedModel, ModelPool
from mlx_manager.engine.textstream import TextStream
from mlx_manager.engine.types import Finished, Started, TextDelta

if TYPE_CHECKING:
    from mlx_manager.engine.engine import EmbeddingJob, Engine, Job

log = logging.getLogger("mlx_manager.engine")


@dataclass
class Slot:
    """A job inside a batch."""

    job: Job
    text: TextStream
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
            self.remove(slot.uid) if slot.text.stopped else self.slots.pop(slot.uid, None)
        return finished

    def _deliver(self, slot: Slot, token: int, reason: str | None) -> bool:
        """Send the text this token completes; True when the job is over."""
        self.fresh.discard(slot.uid)
        job = slot.job
        if reason == "stop":  # an end-of-sequence token: not part of the text
            text = slot.text.finish()
        else:
            job.completion_tokens += 1
            slot.tokens.append(token)
            text = slot.text.add(token)
            if reason == "length" and not slot.text.stopped:
                text += slot.text.finish()
        if text:
            job._emit(TextDelta(text))
        if slot.text.stopped:
            reason = "stop"
        if reason is None:
            return False
        job._emit(Finished(reason, slot.prompt_tokens, job.completion_tokens))
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


class Worker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        config = engine.config
        self.pool = ModelPool(list(config.allowed), config.max_loaded, config.keep_alive, engine.model_load_listeners)
        self.batches: dict[Path, ModelBatch] = {}
        self.pending: deque[Job] = deque()  # waiting for a batch slot
        self.embeddings = EmbeddingQueue()
        self._running = True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while self._running:
            busy = bool(self.batches) or bool(self.pending) or bool(self.embeddings)
            self._drain_commands(block=not busy)
            self._admit_pending()
            for path, batch in list(self.batches.items()):
                self._step(path, batch)
            self._embed_step()
            if not self.batches and not self.embeddings:
                self.pool.sweep()
        self._shutdown()

    def _drain_commands(self, block: bool) -> None:
        timeout = self.pool.next_sweep_in() if block else None
        try:
            command = self.engine._commands.get(timeout=timeout) if block else self.engine._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self.engine._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            self.pending.append(payload)
        elif kind == "embed":
            self._admit_embedding(payload)
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "load":
            self._load(*payload)
        elif kind == "reconfigure":
            self.pool.allowed = list(payload.allowed)
            self.pool.max_loaded = payload.max_loaded
            self.pool.keep_alive = payload.keep_alive
        elif kind == "stop":
            self._running = False

    # -- jobs ----------------------------------------------------------------------------------
    def _admit_pending(self) -> None:
        limit = self.engine.config.max_batch_size
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft()
                self.engine._taken()
                job._release()
                continue
            if sum(len(b) for b in self.batches.values()) >= limit:
                return
            self.pending.popleft()
            self.engine._taken()
            try:
                self._admit(job)
            except EngineError as exc:
                job._emit(exc)
            except Exception as exc:  # a tokenizer or template bug must not take the thread down
                log.exception("job %s could not start", job.request.request_id)
                job._emit(GenerationFailed(f"the request could not be prepared: {type(exc).__name__}"))

    def _admit(self, job: Job) -> None:
        from mlx_manager.engine.sampling import sampler_for

        entry = self.pool.get(job.request.model)
        if entry.kind == "embed":
            raise WrongModelKind(f"model {job.request.model!r} is an embedding model; use /v1/embeddings")
        tokens = self._prompt_tokens(entry, job)
        if entry.context_length and len(tokens) >= entry.context_length:
            raise InvalidRequest(
                f"the prompt has {len(tokens)} tokens; model {job.request.model!r} takes at most {entry.context_length}"
            )
        batch = self.batches.get(entry.path)
        if batch is None:
            batch = self.batches[entry.path] = ModelBatch(entry, self.engine.config.max_batch_size)
        sampling = job.request.sampling
        if sampling.top_k >= _vocab(entry):  # top-k of the whole vocabulary is no top-k; mlx-lm refuses it
            sampling = dataclasses.replace(sampling, top_k=0)
        slot = Slot(job, TextStream(entry.tokenizer.detokenizer, job.request.stop), list(tokens), sampler_for(sampling))
        job.prompt_tokens = len(tokens)
        try:
            batch.add(slot, tokens)
        except Exception:
            self._release(entry.path, batch)  # a batch this job was to open must not stay behind empty
            raise
        entry.active_jobs += 1
        job._emit(Started(len(tokens)))

    @staticmethod
    def _prompt_tokens(entry: LoadedModel, job: Job) -> list[int]:
        request, tokenizer = job.request, entry.tokenizer
        if request.messages is not None:
            if not tokenizer.has_chat_template:
                raise ChatTemplateMissing(f"model {request.model!r} has no chat template; use /v1/completions")
            messages = [{**m, "content": _text_of(m.get("content"))} for m in request.messages]
            tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        elif isinstance(request.prompt, str):
            bos = tokenizer.bos_token
            tokens = tokenizer.encode(request.prompt, add_special_tokens=bos is None or not request.prompt.startswith(bos))
        else:
            tokens = list(request.prompt or [])
            # Checked here, not left to MLX: an id past the embedding table reads out of bounds
            # (a crash of the whole process), and one past int64 fails to convert.
            vocab = _vocab(entry)
            if any(not 0 <= t < vocab for t in tokens):
                raise InvalidRequest(f"prompt token ids must be between 0 and {vocab - 1}")
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        return tokens

    def _cancel(self, job: Job) -> None:
        for path, batch in self.batches.items():
            for slot in list(batch.slots.values()):
                if slot.job is job:
                    batch.remove(slot.uid)
                    batch.entry.active_jobs -= 1
                    self._release(path, batch)
                    job._release()
                    return
        # Still pending: _admit_pending drops it.

    def _step(self, path: Path, batch: ModelBatch) -> None:
        try:
            finished = batch.step()
        except Exception as exc:
            self._fail_step(path, batch, exc)
            return
        for _ in finished:
            batch.entry.active_jobs -= 1
        if not batch.slots:
            self._release(path, batch)

    def _fail_step(self, path: Path, batch: ModelBatch, exc: Exception) -> None:
        """An MLX error in a step fails the jobs that had just joined (all of them if none had)."""
        failed = batch.recover()
        log.error("generation step failed for %d job(s): %s", len(failed), exc)
        for slot in failed:
            batch.entry.active_jobs -= 1
            slot.job._emit(GenerationFailed(f"generation failed: {type(exc).__name__}"))
        if not batch.slots:
            self._release(path, batch)

    def _release(self, path: Path, batch: ModelBatch) -> None:
        if not batch.slots and self.batches.get(path) is batch:
            batch.close()
            del self.batches[path]

    # -- embeddings ----------------------------------------------------------------------------
    def _admit_embedding(self, job: EmbeddingJob) -> None:
        if job.cancelled:
            job.settle()
            return
        try:
            entry = self.pool.get(job.request.model)
            if entry.kind != "embed":
                raise WrongModelKind(f"model {job.request.model!r} is not an embedding model")
            self.embeddings.add(job, entry)
        except EngineError as exc:
            job.settle(error=exc)
            return
        except Exception as exc:  # a tokenizer bug must not take the thread down
            log.exception("embedding job %s could not start", job.request.request_id)
            job.settle(error=GenerationFailed(f"the request could not be prepared: {type(exc).__name__}"))
            return
        entry.active_jobs += 1

    def _embed_step(self) -> None:
        for job in self.embeddings.drop_cancelled():
            job.entry.active_jobs -= 1
            job.settle()
        if not self.embeddings:
            return
        entry = self.embeddings.jobs[0].entry
        try:
            finished = self.embeddings.step()
        except Exception as exc:
            failed = self.embeddings.fail(entry)
            log.error("embedding step failed for %d job(s): %s", len(failed), exc)
            for job in failed:
                entry.active_jobs -= 1
                job.settle(error=GenerationFailed(f"embedding failed: {type(exc).__name__}"))
            return
        for job in finished:
            entry.active_jobs -= 1
            job.settle(result=result_of(job))

    def _load(self, model_id: str, loop, future) -> None:
        def settle(error: BaseException | None) -> None:
            if not future.done():
                future.set_exception(error) if error else future.set_result(None)

        try:
            self.pool.get(model_id)
            error = None
        except EngineError as exc:
            error = exc
        except Exception as exc:
            log.exception("loading %s failed", model_id)
            error = GenerationFailed(f"loading {model_id!r} failed: {type(exc).__name__}")
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:
            pass

    def _shutdown(self) -> None:
        stopped = EngineStopped("the engine stopped")
        for batch in self.batches.values():
            for slot in batch.slots.values():
                slot.job._emit(stopped)
            batch.close()
        self.batches.clear()
        while self.pending:
            self.pending.popleft()._emit(stopped)
        for job in self.embeddings.jobs:
            job.settle(error=stopped)
        self.embeddings.jobs.clear()
        while True:
            try:
                kind, payload = self.engine._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload._emit(stopped)
            elif kind == "embed":
                payload.settle(error=stopped)
        self.pool.unload_all()


def _vocab(entry: LoadedModel) -> int:
    """How many token ids the model knows: its embedding rows, else the tokenizer's size."""
    return entry.vocab_size or len(entry.tokenizer._tokenizer)


def _text_of(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
