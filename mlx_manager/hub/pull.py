"""`models pull`: download an MLX model from the Hugging Face hub into its cache, resumably.

    plan = make_plan("mlx-community/Qwen3-0.6B-4bit")   # HubError: not found, gated, not MLX, no room...
    result = download(plan, on_event)                  # on_event gets the progress events below

huggingface_hub speaks to the hub (its API and URL layout, `HF_ENDPOINT`, `HF_TOKEN`) and owns
the cache layout (`HF_HOME`). The bytes of each file are fetched here, into the cache's
`blobs/<etag>.incomplete`, because huggingface_hub 2.x throws a partial file away (and writes in
10 MB pieces): kept, a pull cut by Ctrl-C or a dropped connection goes on where it stopped, with
an HTTP Range request. A finished blob is checked against the hub's checksum and handed to
`hf_hub_download`, which links it into the snapshot without downloading it again. Xet-stored
files come over plain HTTP too (the hub serves them so): one resumable path for every file.

Events, one dict each (the `--json` lines of `models pull`, the daemon's pull stream):
  plan       model, revision, commit, files [{name, size, cached}], total_bytes (to fetch),
             present_bytes (already here from an interrupted pull), free_bytes, cache
  file       name, size, resume_from
  progress   name, file_bytes, file_size, bytes, total_bytes, bytes_per_second, eta_seconds
  file_done  name, size
  check      path                     (mlx-lm / mlx-embeddings is loading what arrived)
  done       model (the id to serve), commit, path, kind, quantization, size_bytes,
             downloaded_bytes, seconds
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mlx_manager.files import private_lock
from mlx_manager.hub.cache import (
    DEFAULT_REVISION,
    hf_cache_dir,
    parse_model_ref,
    quantization_of,
    read_config,
    repo_folder,
    served_id,
)
from mlx_manager.hub.errors import HubError

Event = dict[str, Any]
OnEvent = Callable[[Event], None]

# The files a model needs, as mlx-lm fetches them (its DEFAULT_ALLOW_PATTERNS) minus `*.py`:
# weights, config, tokenizer, chat template; sentence-transformers' module configs are `*.json`.
MODEL_FILES = ("*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jinja")
WEIGHTS = "model*.safetensors"
PROGRESS_EVERY = 0.25  # seconds between progress events of one file
READ_TIMEOUT = 30.0  # seconds without a byte before a connection counts as dropped
RETRIES = 5  # dropped connections in a row, without progress, before a pull gives up
CHECK_TIMEOUT = 900.0

# What a repo that is not an MLX model holds instead, by file name pattern.
_FOREIGN_FORMATS = (
    ("*.gguf", "GGUF files (for llama.cpp)"),
    ("*.bin", "PyTorch .bin weights"),
    ("*.pt", "PyTorch .pt weights"),
    ("*.pth", "PyTorch .pth weights"),
    ("*.onnx", "ONNX files"),
    ("*.h5", "Keras/TensorFlow weights"),
    ("*.safetensors", "safetensors weights not named model*.safetensors"),
)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    etag: str | None  # the hub's checksum: an LFS file's SHA-256, else its git blob id
    cached: bool  # already in the cache (this revision's snapshot, or the same blob)


@dataclass(frozen=True)
class Plan:
    repo_id: str
    revision: str  # as asked ("main" when none was)
    commit: str
    files: tuple[RemoteFile, ...]
    present_bytes: int  # of interrupted downloads, reused
    free_bytes: int
    endpoint: str | None

    @property
    def to_fetch(self) -> list[RemoteFile]:
        return [f for f in self.files if not f.cached]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.to_fetch)

    @property
    def storage(self) -> Path:
        return repo_folder(self.repo_id)

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    def event(self) -> Event:
        return {
            "event": "plan",
            "model": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": [{"name": f.name, "size": f.size, "cached": f.cached} for f in self.files],
            "total_bytes": self.total_bytes,
            "present_bytes": self.present_bytes,
            "free_bytes": self.free_bytes,
            "cache": str(self.storage),
        }


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def _truthy(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() in ("1", "true", "yes", "on")


# -- planning ---------------------------------------------------------------------------------------------


def make_plan(model_ref: str) -> Plan:
    """Ask the hub what `org/name[@REVISION]` holds, keep the files a model needs, and check that
    they make an MLX model and fit on the disk. Raises HubError; downloads nothing."""
    repo_id, revision = parse_model_ref(model_ref)
    revision = revision or DEFAULT_REVISION
    if _truthy("HF_HUB_OFFLINE"):
        raise HubError("offline", "HF_HUB_OFFLINE is set, so nothing can be downloaded", "Unset it to pull.")
    from huggingface_hub import HfApi

    endpoint = hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(exc, repo_id, revision, endpoint) from None
    if not info.sha:
        raise HubError("hub_error", f"the hub did not say which commit {repo_id}@{revision} is")
    siblings = {s.rfilename: s for s in info.siblings or []}
    _check_mlx_files(repo_id, list(siblings))
    storage = repo_folder(repo_id)
    files, present = [], 0
    for name in sorted(n for n in siblings if any(fnmatch.fnmatch(n, p) for p in MODEL_FILES)):
        sibling = siblings[name]
        etag = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
        linked = (storage / "snapshots" / info.sha / name).exists()
        cached = linked or bool(etag and (storage / "blobs" / etag).exists())
        if not cached and etag:
            present += _size(storage / "blobs" / f"{etag}.incomplete")
        files.append(RemoteFile(name, int(sibling.size or 0), etag, cached))
    free = shutil.disk_usage(_existing_parent(storage)).free
    plan = Plan(repo_id, revision, info.sha, tuple(files), present, free, endpoint)
    needed = plan.total_bytes - present
    if needed > free:
        raise HubError(
            "disk_full",
            f"{repo_id} needs {format_bytes(needed)} more disk space and {_existing_parent(storage)} has "
            f"{format_bytes(free)} free",
            "Free some space, or point HF_HOME at a disk with more.",
        )
    return plan


def _check_mlx_files(repo_id: str, names: list[str]) -> None:
    """A repo without config.json and model*.safetensors is not something mlx-lm can load: say what it holds."""
    missing = [
        what
        for what, ok in (
            ("config.json", "config.json" in names),
            ("model*.safetensors weights", any(fnmatch.fnmatch(n, WEIGHTS) for n in names)),
        )
        if not ok
    ]
    if not missing:
        return
    found = [
        label
        for pattern, label in _FOREIGN_FORMATS
        if any(fnmatch.fnmatch(n, pattern) and not fnmatch.fnmatch(n, WEIGHTS) for n in names)
    ]
    if not names:
        holds = "; it is empty"
    else:
        holds = f"; it holds {', '.join(found or sorted(names)[:5])}"
    raise HubError(
        "not_mlx",
        f"{repo_id} is not an MLX model: it has no {' and no '.join(missing)}{holds}",
        "Look for an MLX conversion of it (e.g. under https://huggingface.co/mlx-community)"
        " or make one with mlx_lm.convert.",
    )


def hub_error(exc: Exception, repo_id: str, revision: str, endpoint: str | None) -> HubError:
    """huggingface_hub's exception (or its HTTP client's) as one HubError that says what to do."""
    import httpx  # the bytes come over httpx (`_stream_into`)
    import httpx2  # huggingface_hub's own client
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = endpoint or "https://huggingface.co"
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError("offline", "HF_HUB_OFFLINE is set, so nothing can be downloaded", "Unset it to pull.")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(
            "revision_not_found",
            f"{repo_id} has no revision {revision!r}",
            "Give a branch, a tag or a commit hash that exists.",
        )
    if isinstance(exc, GatedRepoError):
        return HubError(
            "gated",
            f"{repo_id} is gated: its conditions must be accepted before it can be downloaded",
            f"Accept them at {hub}/{repo_id} and set HF_TOKEN to a token of that account.",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            "not_found",
            f"{repo_id} was not found on {hub}",
            "Check the id; a private repo also needs HF_TOKEN set to a token that may read it.",
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return HubError(
            "unauthorized",
            f"{hub} refused the token (HF_TOKEN or the saved login): it is invalid or expired",
            "Set HF_TOKEN to a valid token, or unset it for public models.",
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        return HubError("hub_error", f"{hub} answered {status} for {repo_id}", "Try again later.")
    if isinstance(exc, (httpx.TransportError, httpx2.TransportError, ConnectionError, TimeoutError)):
        return HubError(
            "unreachable",
            f"cannot reach the Hugging Face hub at {hub} ({type(exc).__name__}: {exc})",
            "Check the network (and HF_ENDPOINT, if set); an interrupted pull resumes when run again.",
        )
    return HubError("hub_error", f"downloading {repo_id} failed: {type(exc).__name__}: {exc}")


# -- downloading ------------------------------------------------------------------------------------------


@dataclass
class Tracker:
    """Counts a pull's bytes and turns them into events; raises HubError("cancelled") once `cancel` is set."""

    plan: Plan
    on_event: OnEvent
    cancel: threading.Event | None = None
    done: int = 0
    file_bytes: dict[str, int] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic)
    _last: dict[str, float] = field(default_factory=dict)
    _reported: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.done = self._start_done = self.plan.present_bytes

    def begin(self, remote: RemoteFile, resume_from: int) -> None:
        self.file_bytes[remote.name] = resume_from
        self.on_event({"event": "file", "name": remote.name, "size": remote.size, "resume_from": resume_from})

    def advance(self, name: str, size: int, n: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise HubError("cancelled", "the pull was cancelled")
        self.file_bytes[name] = self.file_bytes.get(name, 0) + n
        self.done += n
        now = time.monotonic()
        if now - self._last.get(name, 0.0) >= PROGRESS_EVERY:
            self._last[name] = now
            self.report(name, size)

    def report(self, name: str, size: int) -> None:
        if self._reported.get(name) == self.file_bytes.get(name):
            return  # nothing new since this file's last event
        self._reported[name] = self.file_bytes.get(name, 0)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        speed = max(self.done - self._start_done, 0) / elapsed
        left = max(self.plan.total_bytes - self.done, 0)
        self.on_event(
            {
                "event": "progress",
                "name": name,
                "file_bytes": self.file_bytes.get(name, 0),
                "file_size": size,
                "bytes": self.done,
                "total_bytes": self.plan.total_bytes,
                "bytes_per_second": round(speed),
                "eta_seconds": round(left / speed, 1) if speed > 0 else None,
            }
        )


@dataclass(frozen=True)
class PullResult:
    model: str  # the id to serve it as
    commit: str
    path: Path
    kind: str
    downloaded_bytes: int
    seconds: float


def download(plan: Plan, on_event: OnEvent, cancel: threading.Event | None = None) -> PullResult:
    """Fetch the plan's files, link them into the snapshot, record the revision and check that the
    engine can load the result. Raises HubError; a partial file stays for the next pull to finish."""
    from huggingface_hub import hf_hub_download

    started = time.monotonic()
    tracker = Tracker(plan, on_event, cancel)
    cache_dir = hf_cache_dir()
    try:
        for remote in plan.files:
            if not remote.cached:
                _fetch_blob(plan, remote, tracker)
                tracker.report(remote.name, remote.size)
                on_event({"event": "file_done", "name": remote.name, "size": remote.size})
            # The blob is in place: huggingface_hub links it into this commit's snapshot, no download.
            hf_hub_download(
                plan.repo_id, remote.name, revision=plan.commit, cache_dir=cache_dir, endpoint=plan.endpoint
            )
    except HubError:
        raise
    except Exception as exc:
        raise hub_error(exc, plan.repo_id, plan.revision, plan.endpoint) from None
    if plan.revision != plan.commit:
        _write_ref(plan.storage, plan.revision, plan.commit)
    on_event({"event": "check", "path": str(plan.snapshot)})
    kind = check_loadable(plan.snapshot, plan.repo_id)
    refs = (plan.revision,) if plan.revision != plan.commit else ()
    result = PullResult(
        served_id(plan.repo_id, refs, plan.commit),
        plan.commit,
        plan.snapshot,
        kind,
        tracker.done - plan.present_bytes,
        time.monotonic() - started,
    )
    config = read_config(plan.snapshot) or {}
    on_event(
        {
            "event": "done",
            "model": result.model,
            "commit": result.commit,
            "path": str(result.path),
            "kind": kind,
            "quantization": quantization_of(config),
            "size_bytes": sum(f.size for f in plan.files),
            "downloaded_bytes": result.downloaded_bytes,
            "seconds": round(result.seconds, 3),
        }
    )
    return result


def _fetch_blob(plan: Plan, remote: RemoteFile, tracker: Tracker) -> None:
    """Download one file into `blobs/<etag>`, going on from `<etag>.incomplete` if a pull left one."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(plan.repo_id, remote.name, revision=plan.commit, endpoint=plan.endpoint)
    metadata = get_hf_file_metadata(url, endpoint=plan.endpoint)
    if not metadata.etag:
        raise HubError("hub_error", f"the hub gave no checksum (ETag) for {remote.name}")
    blobs = plan.storage / "blobs"
    blob = blobs / metadata.etag
    if blob.exists():
        return
    blobs.mkdir(parents=True, exist_ok=True)
    (plan.storage / "snapshots").mkdir(exist_ok=True)  # so the cache sees the repo, and `models rm` can remove it
    partial = blobs / f"{metadata.etag}.incomplete"
    headers = build_hf_headers()
    if _host(metadata.location) != _host(url):
        headers.pop("authorization", None)  # a CDN's signed URL: the token is not for it
    size = metadata.size if metadata.size is not None else remote.size
    with _pull_lock(plan, metadata.etag), partial.open("ab") as sink:
        tracker.begin(remote, sink.tell())
        _stream_into(sink, metadata.location, size, headers, lambda n: tracker.advance(remote.name, remote.size, n))
    if not _matches(partial, metadata.etag):
        partial.unlink(missing_ok=True)
        raise HubError(
            "corrupt",
            f"{remote.name} arrived damaged (its checksum does not match the hub's)",
            "Run the same command again to download it afresh.",
        )
    os.replace(partial, blob)


def _stream_into(sink: BinaryIO, url: str, size: int, headers: dict[str, str], advance: Callable[[int], None]) -> None:
    """Append the rest of the file at `url` to `sink`, which holds its first `sink.tell()` bytes.

    A dropped or stalled connection is resumed with a Range request, up to RETRIES times in a row
    without progress; a server that ignores the range is answered by starting over. Every piece
    is written as it arrives, so an interruption loses nothing already received."""
    import httpx

    name = url.rsplit("/", 1)[-1]
    failures = 0
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(READ_TIMEOUT)) as client:
        while sink.tell() < size:
            have = sink.tell()
            asked = {**headers, "Range": f"bytes={have}-"} if have else headers
            try:
                with client.stream("GET", url, headers=asked) as got:
                    if got.status_code not in (200, 206):
                        raise HubError(
                            "hub_error",
                            f"{_host(url)} answered {got.status_code} for {name}",
                            "Try again later; the pull goes on from where it stopped.",
                        )
                    if have and got.status_code == 200:  # the range was ignored: the whole file is coming
                        sink.seek(0)
                        sink.truncate()
                        advance(-have)
                    for piece in got.iter_bytes():
                        sink.write(piece)
                        advance(len(piece))
                        failures = 0
            except httpx.TransportError:
                failures += 1
                if failures > RETRIES:
                    raise
                time.sleep(0.5 * failures)
    if sink.tell() != size:
        raise HubError(
            "corrupt",
            f"{name} arrived with {sink.tell()} bytes instead of {size}",
            "Run the same command again to download it afresh.",
        )


@contextlib.contextmanager
def _pull_lock(plan: Plan, etag: str) -> Iterator[None]:
    """One pull at a time writes a given partial file; another one is told so instead of corrupting it."""
    from filelock import Timeout

    lock = private_lock(hf_cache_dir() / ".locks" / plan.storage.name / f"{etag}.pull.lock")
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        raise HubError(
            "busy",
            f"another pull is downloading {plan.repo_id} right now",
            "Wait for it to finish; it leaves the model in the same cache.",
        ) from None
    try:
        yield
    finally:
        lock.release()


def _matches(path: Path, etag: str) -> bool:
    """The file against the hub's checksum: an LFS file's SHA-256, or git's blob SHA-1."""
    if len(etag) == 64:
        digest = hashlib.sha256()
    elif len(etag) == 40:
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    else:
        return True  # a checksum of a kind we do not know: the size check stands
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == etag


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """refs/<revision> names the commit a branch or tag was pulled at, as huggingface_hub records it."""
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def check_loadable(path: Path, repo_id: str) -> str:
    """Load the model the way the daemon will (lazily, in a process of its own: no MLX here);
    its kind, or HubError("not_mlx") saying why it cannot be loaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mlx_manager.engine.check", str(path)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise HubError("not_mlx", f"checking that {repo_id} loads took over {CHECK_TIMEOUT:.0f}s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if done.returncode == 0 and answer.get("kind"):
        return str(answer["kind"])
    last_words = done.stderr.strip().splitlines() or [f"it exited with status {done.returncode}"]
    reason = answer.get("error") or last_words[-1]
    raise HubError(
        "not_mlx",
        f"{repo_id} downloaded, but it cannot be loaded: {reason}",
        f"It stays in the cache ({path}); `mlx-manager models rm {repo_id}` removes it.",
    )


# -- small helpers --------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def format_bytes(n: float) -> str:
    """1.2 GB, 640.0 kB: decimal units, as disks and the hub count."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} {units[-1]}"
