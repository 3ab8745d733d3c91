"""The inference thread: the one place MLX runs.

It takes commands (see `commands.py`) from its queue, keeps one `ModelBatch` per model with
running jobs, advances every batch one decode step per loop, runs embedding batches between
them, and unloads idle models. After each round it publishes a `WorkerSnapshot` that the
engine's `status()` reads from the event loop's thread, so nothing else ever reads the pool.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_manager.engine.batch import ModelBatch, Slot
from mlx_manager.engine.commands import (
    Cancel,
    ClearCache,
    Command,
    CountTokens,
    Embed,
    Load,
    Reconfigure,
    Stop,
    Submit,
    Unload,
)
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.embedding_queue import EmbeddingQueue, entry_of, result_of
from mlx_manager.engine.errors import (
    ChatTemplateMissing,
    ContextLengthExceeded,
    EngineError,
    EngineStopped,
    GenerationFailed,
    InvalidRequest,
    ModelBusy,
    ModelNotLoaded,
    ModelUnloaded,
    ToolsNotSupported,
    WrongModelKind,
)
from mlx_manager.engine.jobs import EmbeddingJob, Job
from mlx_manager.engine.logits import penalty_processors
from mlx_manager.engine.open_files import import_mlx_lm
from mlx_manager.engine.output import Output
from mlx_manager.engine.pacing import Plan, PrefillPacer
from mlx_manager.engine.pool import LoadedModel, ModelAccess, ModelPool
from mlx_manager.engine.prompt_cache import PromptCache
from mlx_manager.engine.prompt_cache_disk import DiskTier, model_identity
from mlx_manager.engine.structured import constraint_for
from mlx_manager.engine.types import GenerationRequest, ModelStatus, Started

log = logging.getLogger("mlx_manager.engine")


@dataclass(frozen=True)
class WorkerSnapshot:
    """The inference thread's state as of its last round; replaced whole, never changed."""

    models: tuple[ModelStatus, ...] = ()
    loading: str | None = None


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        commands: queue.SimpleQueue[Command],
        load_listeners: list[Callable[[str, float], None]],
    ) -> None:
        self.config = config
        self.commands = commands
        self.stopping = threading.Event()  # set by Engine.stop: a model load in progress is abandoned
        self.pool = ModelPool(
            ModelAccess.of(config),
            config.max_loaded,
            config.keep_alive,
            load_listeners,
            on_change=self._publish,
            stopping=self.stopping,
        )
        self.batches: dict[Path, ModelBatch] = {}
        self.pending: deque[Job] = deque()  # waiting for a batch slot
        self.embeddings = EmbeddingQueue()
        self.pacer = PrefillPacer()
        self.snapshot = WorkerSnapshot()
        self._running = True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """The loop, until a Stop; if it fails, every job and command it has is still answered
        (EngineStopped) before the failure goes up."""
        try:
            import_mlx_lm()  # first, on this thread: mlx-lm's import would lower the open-file limit
            while self._running:
                busy = bool(self.batches) or bool(self.pending) or bool(self.embeddings)
                self._drain_commands(block=not busy)
                self._admit_pending()
                self._step_batches()
                self._embed_step()
                if not self.batches and not self.embeddings:
                    self.pool.sweep()
                self._publish()
        finally:
            self._shutdown()

    def _publish(self) -> None:
        queued = Counter(path for job in self.pending if (path := self.pool.path_of(job.request.model)) is not None)
        self.snapshot = WorkerSnapshot(models=self.pool.statuses(queued), loading=self.pool.loading)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=self.pool.next_sweep_in()) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: Command) -> None:
        match command:
            case Submit(job):
                self.pending.extend(job.group or (job,))
            case Embed(job):
                self._admit_embedding(job)
            case Cancel(job):
                self._cancel(job)
            case Load(model_id, reply):
                try:
                    entry = self.pool.load(model_id)
                    reply.settle(next(s for s in self.pool.statuses() if s.path == str(entry.path)))
                except EngineError as exc:
                    reply.settle(error=exc)
                except Exception as exc:
                    log.exception("loading %s failed", model_id)
                    reply.settle(error=GenerationFailed(f"loading {model_id!r} failed: {type(exc).__name__}"))
            case Unload(model_id, force, reply):
                try:
                    self._unload(model_id, force)
                    reply.settle(None)
                except EngineError as exc:
                    reply.settle(error=exc)
            case CountTokens(request, reply):
                try:
                    reply.settle(len(prompt_tokens(self._generator(request.model), request)))
                except EngineError as exc:
                    reply.settle(error=exc)
                except Exception as exc:  # a tokenizer or template bug must not take the thread down
                    log.exception("counting the prompt tokens of %s failed", request.request_id)
                    reply.settle(error=GenerationFailed(f"the prompt could not be prepared: {type(exc).__name__}"))
            case ClearCache(reply):
                caches = [e.prompt_cache for e in self.pool.entries() if e.prompt_cache is not None]
                gone = 0
                for cache in caches:
                    status = cache.status()
                    gone += status.entries + status.disk_entries
                    cache.clear()
                reply.settle(gone)
            case Reconfigure(config):
                self.config = config
                self.pool.access = ModelAccess.of(config)
                self.pool.max_loaded = config.max_loaded
                self.pool.keep_alive = config.keep_alive
                for entry in self.pool.entries():
                    if entry.prompt_cache is not None:
                        entry.prompt_cache.max_bytes = config.cache_max_bytes
                        entry.prompt_cache.max_entries = config.cache_max_entries
                        entry.prompt_cache.shrink()
            case Stop():
                self._running = False

    # -- generation jobs ---------------------------------------------------------------------
    def _admit_pending(self) -> None:
        limit = self.config.max_batch_size
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft()
                job.end()
                continue
            running = sum(len(b) for b in self.batches.values())
            group = [j for j in job.group or (job,) if j in self.pending]
            # The choices of one request go in together; a group larger than the batch goes in alone.
            if running >= limit or (running and running + len(group) > limit):
                return
            for member in group:
                self.pending.remove(member)
                member.take()
            live = [member for member in group if not member.cancelled]
            for member in group:
                if member.cancelled:
                    member.end()
            if not live:
                continue
            try:
                self._admit(live)
            except EngineError as exc:
                for member in live:
                    member.emit(exc)
            except Exception as exc:  # a tokenizer or template bug must not take the thread down
                log.exception("job %s could not start", job.request.request_id)
                for member in live:
                    member.emit(GenerationFailed(f"the request could not be prepared: {type(exc).__name__}"))

    def _generator(self, model_id: str) -> LoadedModel:
        """The model, loaded, if it generates text (an embedding model does not)."""
        entry = self.pool.load(model_id)
        if entry.kind == "embed":
            raise WrongModelKind(f"model {model_id!r} is an embedding model; use /v1/embeddings")
        return entry

    def _admit(self, jobs: list[Job]) -> None:
        """Start a job, or the choices of one request (they share its prompt, read once)."""
        from mlx_manager.engine.sampling import sampler_for

        request = jobs[0].request
        entry = self._generator(request.model)
        tokens = prompt_tokens(entry, request)
        max_tokens = fitting_max_tokens(entry, request, len(tokens))
        check_logit_bias(entry, request)
        batch = self.batches.get(entry.path)
        if batch is None:
            if entry.prompt_cache is None:
                entry.prompt_cache = self._prompt_cache(entry)
            batch = ModelBatch(entry, self.config.max_batch_size, entry.prompt_cache, self.config.prefill_chunk)
            self.batches[entry.path] = batch
        sampling = request.sampling
        if sampling.top_k >= vocab_size(entry):  # top-k of the whole vocabulary is no top-k; mlx-lm refuses it
            sampling = dataclasses.replace(sampling, top_k=0)
        slots, compile_ms = [], None
        for index, job in enumerate(jobs):
            output = Output(
                entry.tokenizer,
                tokens,
                request.stop,
                chat=request.messages is not None,
                tools=request.tools,
                parallel_tool_calls=request.parallel_tool_calls,
            )
            constraint = constraint_for(entry, request, tokens)
            compile_ms = constraint.compile_ms if constraint else None
            processors = penalty_processors(request.penalties, vocab_size(entry), tokens)
            processors += [constraint.processor] if constraint else []
            # Seeded choices each get their own seed, so n > 1 is n samples, not one repeated.
            seeded = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + index)
            slots.append(Slot(job, output, list(tokens), sampler_for(seeded), processors, max_tokens))
            job.prompt_tokens = len(tokens)
        try:
            if len(slots) == 1:
                batch.add(slots[0], tokens)
            else:
                batch.add_choices(slots, tokens)
        except Exception:
            self._release(entry.path, batch)  # a batch this job was to open must not stay behind empty
            raise
        entry.active_jobs += len(jobs)
        for job in jobs:
            job.emit(Started(len(tokens), compile_ms))

    def _prompt_cache(self, entry: LoadedModel) -> PromptCache:
        config = self.config
        disk = None
        if config.cache_disk_folder:
            folder = Path(config.cache_disk_folder) / model_identity(entry.path)
            disk = DiskTier(folder, config.cache_disk_max_bytes)
        return PromptCache(config.cache_max_bytes, config.cache_max_entries, disk)

    def _cancel(self, job: Job) -> None:
        for path, batch in self.batches.items():
            for slot in list(batch.slots.values()):
                if slot.job is job:
                    batch.remove(slot.uid)  # no cache entry: its state may be half computed
                    batch.entry.active_jobs -= 1
                    self._release(path, batch)
                    job.end()
                    return
        if job in self.pending:  # still waiting for a slot: out of the line now, not when it comes up
            self.pending.remove(job)
            job.end()

    def _step_batches(self) -> None:
        """One step of every model's batch; while streams decode, prompts are read in a burst
        and then paced reads between runs of decode-only rounds (see `pacing.py`)."""
        started = time.perf_counter()
        streams = sum(batch.streams for batch in self.batches.values())
        prompts = sum(len(batch.prefills) for batch in self.batches.values())
        decoding = streams > 0
        plan = self.pacer.plan(self.config.prefill_chunk, streams, prompts)
        read = sum(self._step(path, batch, plan) for path, batch in list(self.batches.items()))
        if self.batches or read:
            self.pacer.observe(time.perf_counter() - started, decoding, read)

    def _step(self, path: Path, batch: ModelBatch, plan: Plan) -> int:
        """One step of one batch; returns how many prompt tokens it read."""
        try:
            finished, read = batch.step(plan)
        except Exception as exc:
            self._fail_step(path, batch, exc)
            return 0
        batch.entry.active_jobs -= len(finished)
        if not batch.slots:
            self._release(path, batch)
        return read

    def _fail_step(self, path: Path, batch: ModelBatch, exc: Exception) -> None:
        """An MLX error in a step fails the jobs that had just joined (all of them if none had)."""
        failed = batch.recover()
        log.error("generation step failed for %d job(s): %s", len(failed), exc)
        for slot in failed:
            batch.entry.active_jobs -= 1
            slot.job.emit(GenerationFailed(f"generation failed: {type(exc).__name__}"))
        if not batch.slots:
            self._release(path, batch)

    def _release(self, path: Path, batch: ModelBatch) -> None:
        if not batch.slots and self.batches.get(path) is batch:
            batch.close()
            del self.batches[path]

    def _unload(self, model_id: str, force: bool) -> None:
        """Unload a model on request. Its jobs (running, waiting for a slot, embedding) block it
        unless `force`: then each ends with ModelUnloaded first, so no caller waits forever."""
        entry = self.pool.find(model_id)
        if entry is None:
            raise ModelNotLoaded(f"model {model_id!r} is not loaded")
        waiting = [job for job in self.pending if self.pool.path_of(job.request.model) == entry.path]
        busy = entry.active_jobs + len(waiting)
        if busy and not force:
            raise ModelBusy(f"model {model_id!r} has {busy} job(s) running or waiting; force the unload to end them")
        gone = ModelUnloaded(f"model {entry.model_id!r} was unloaded by an administrator")
        batch = self.batches.pop(entry.path, None)
        if batch is not None:
            for slot in batch.slots.values():
                slot.job.emit(gone)
            batch.close()
        for job in waiting:
            self.pending.remove(job)
            job.emit(gone)
        for embedding_job in self.embeddings.fail(entry):
            embedding_job.settle(error=gone)
        entry.active_jobs = 0
        self.pool.unload(entry, "unloaded on request")

    # -- embedding jobs ----------------------------------------------------------------------
    def _admit_embedding(self, job: EmbeddingJob) -> None:
        if job.cancelled:
            job.settle()
            return
        try:
            entry = self.pool.load(job.request.model)
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
            entry_of(job).active_jobs -= 1
            job.settle()
        if not self.embeddings:
            return
        entry = entry_of(self.embeddings.jobs[0])
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

    # -- the end -----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        stopped = EngineStopped("the engine stopped")
        for batch in self.batches.values():
            for slot in batch.slots.values():
                slot.job.emit(stopped)
            batch.close()
        self.batches.clear()
        while self.pending:
            self.pending.popleft().emit(stopped)
        for waiting in self.embeddings.jobs:
            waiting.settle(error=stopped)
        self.embeddings.jobs.clear()
        self.answer_commands()
        self.pool.unload_all()
        self._publish()

    def answer_commands(self) -> None:
        """Answer every command still queued with EngineStopped (the loop is over)."""
        stopped = EngineStopped("the engine stopped")
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case Submit(submitted):
                    for member in submitted.group or (submitted,):
                        member.emit(stopped)
                case Embed(embedding):
                    embedding.settle(error=stopped)
                case Load(_, reply) | Unload(_, _, reply) | CountTokens(_, reply) | ClearCache(reply):
                    reply.settle(error=stopped)


def vocab_size(entry: LoadedModel) -> int:
    """How many token ids the model knows: its embedding rows, else the tokenizer's size."""
    return entry.vocab_size or len(entry.tokenizer._tokenizer)


def fitting_max_tokens(entry: LoadedModel, request: GenerationRequest, prompt: int) -> int:
    """The job's max_tokens within the model's context: a default is cut to what the prompt
    leaves; a prompt that leaves no room, or a max_tokens the client asked for that does not
    fit, is refused in OpenAI's words (clients look for "maximum context length")."""
    context = entry.context_length
    if not context:
        return request.max_tokens
    part = "messages" if request.messages is not None else "prompt"
    if prompt >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens. However, your {part} resulted in"
            f" {prompt} tokens. Please reduce the length of the {part}.",
            param=part,
        )
    room = context - prompt
    if request.max_tokens <= room:
        return request.max_tokens
    if request.max_tokens_is_default:
        return room
    raise ContextLengthExceeded(
        f"This model's maximum context length is {context} tokens. However, you requested"
        f" {prompt + request.max_tokens} tokens ({prompt} in the {part}, {request.max_tokens} in the completion)."
        f" Please reduce the length of the {part} or completion.",
        param=part,
    )


def check_logit_bias(entry: LoadedModel, request: GenerationRequest) -> None:
    vocab = vocab_size(entry)
    wrong = sorted(t for t in request.penalties.logit_bias if not 0 <= t < vocab)
    if wrong:
        raise InvalidRequest(
            f"logit_bias: token id {wrong[0]} is not in the vocabulary of model {request.model!r} (0 to {vocab - 1})",
            param="logit_bias",
        )


NAME_PROBE = "\u2063name-probe\u2063"


def check_names_are_read(tokenizer: Any, request: GenerationRequest) -> None:
    """A message `name` reaches the model only if the chat template writes it: the template is
    rendered again with every name changed, and the same text means the names were dropped."""
    messages = request.messages or []
    named = [i for i, message in enumerate(messages) if message.get("name")]
    if not named:
        return
    probed = [{**m, "name": NAME_PROBE} if m.get("name") else m for m in messages]
    render = {"tools": request.tools, "add_generation_prompt": True, "tokenize": False, **request.template_kwargs}
    if tokenizer.apply_chat_template(messages, **render) == tokenizer.apply_chat_template(probed, **render):
        raise InvalidRequest(
            f"messages.{named[0]}.name: the chat template of model {request.model!r} does not use message names,"
            " so the model would never see it; put the name in the message content",
            param=f"messages.{named[0]}.name",
        )


def prompt_tokens(entry: LoadedModel, request: GenerationRequest) -> list[int]:
    """The prompt as token ids: the chat template applied to the messages, or the text encoded."""
    from jinja2 import TemplateError  # what chat templates raise; comes with transformers

    tokenizer = entry.tokenizer
    if request.messages is not None:
        if not tokenizer.has_chat_template:
            raise ChatTemplateMissing(f"model {request.model!r} has no chat template; use /v1/completions")
        if request.reasoning_effort not in (None, "none") and not tokenizer.has_thinking:
            raise InvalidRequest(
                f"reasoning_effort: model {request.model!r} does not think (its tokenizer has no thinking section)"
            )
        if request.tools is not None and not tokenizer.has_tool_calling:
            raise ToolsNotSupported(
                f"model {request.model!r} has no tool-call format in its chat template, so it cannot be offered tools"
            )
        try:
            tokens = list(
                tokenizer.apply_chat_template(
                    request.messages, tools=request.tools, add_generation_prompt=True, **request.template_kwargs
                )
            )
            check_names_are_read(tokenizer, request)
        except TemplateError as exc:  # the template's own checks (roles that must alternate...)
            raise InvalidRequest(f"the chat template of model {request.model!r} refused the messages: {exc}") from None
    elif isinstance(request.prompt, str):
        bos = tokenizer.bos_token
        tokens = tokenizer.encode(request.prompt, add_special_tokens=bos is None or not request.prompt.startswith(bos))
    else:
        tokens = list(request.prompt or [])
        # Checked here, not left to MLX: an id past the embedding table reads out of bounds
        # (a crash of the whole process), and one past int64 fails to convert.
        vocab = vocab_size(entry)
        if any(not 0 <= t < vocab for t in tokens):
            raise InvalidRequest(f"prompt token ids must be between 0 and {vocab - 1}")
    if not tokens:
        raise InvalidRequest("the prompt is empty")
    return tokens
