"""The models on this machine: the Hugging Face cache, laid out as huggingface_hub lays it out
(`HF_HUB_CACHE`, else `HF_HOME/hub`), and the folders named in `models.folders`. No network.

A cached repo is served as `org/name` when it is the default branch (`main`), else as
`org/name@REF` (a tag or branch it was pulled at) or `org/name@COMMIT`: `engine.pool.resolve`
takes all three.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_manager.hub.errors import HubError

# What the hub accepts as a repo id: `org/name`, letters, digits, '.', '_' and '-', no '--' or '..'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
DEFAULT_REVISION = "main"


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps repos, read from the environment at each call (the library
    reads it once, when it is imported)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def repo_folder(repo_id: str) -> Path:
    """The cache folder of a model repo: `models--org--name`."""
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def parse_model_ref(text: str) -> tuple[str, str | None]:
    """`org/name` or `org/name@REVISION` -> (repo id, revision or None); HubError("invalid_id") otherwise."""
    repo_id, at, revision = text.strip().partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(
            "invalid_id",
            f"{text!r} is not a Hugging Face repo id",
            "Give it as ORG/NAME or ORG/NAME@REVISION, e.g. mlx-community/Qwen3-0.6B-4bit.",
        )
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise HubError("invalid_id", f"{revision!r} is not a revision (a branch, a tag or a commit hash)")
    return repo_id, revision or None


# -- what a model folder holds ----------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def kind_of(path: Path, config: dict[str, Any]) -> str:
    """ "embedding", "chat" (a generative model with a chat template) or "text" (completions only)."""
    from mlx_manager.engine.embedding_model import is_embedding_model  # no MLX: a look at the files

    if is_embedding_model(path, config):
        return "embedding"
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return "chat"
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "text"
    return "chat" if isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template") else "text"


_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def quantization_of(config: dict[str, Any]) -> str | None:
    """ "4-bit" for an MLX-quantized model, the quantization method of another, else its dtype."""
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and mlx.get("bits"):
        return f"{mlx['bits']}-bit"
    other = config.get("quantization_config")
    if isinstance(other, dict):
        bits, method = other.get("bits"), other.get("quant_method")
        return " ".join(str(p) for p in (f"{bits}-bit" if bits else None, method) if p) or "quantized"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _DTYPES.get(str(dtype), str(dtype)) if dtype else None


# -- listing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    id: str  # what to serve it as
    path: Path
    source: str  # "hf-cache" or "folder"
    size_bytes: int
    kind: str
    quantization: str | None
    commit: str | None = None
    refs: tuple[str, ...] = ()


def local_models(folders: list[str]) -> list[LocalModel]:
    """Every servable model here (a config.json and safetensors weights): the HF cache's, then
    the configured folders' (each folder, or each of its subfolders, that is a model)."""
    return [*_cached_models(), *_folder_models(folders)]


def _cached_models() -> list[LocalModel]:
    cache = hf_cache_dir()
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    found = []
    for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: (DEFAULT_REVISION not in r.refs, sorted(r.refs))):
            path = Path(revision.snapshot_path)
            config = read_config(path)
            if config is None or not has_weights(path):
                continue  # not a model, or a pull that has not finished
            refs = tuple(sorted(revision.refs))
            found.append(
                LocalModel(
                    id=served_id(repo.repo_id, refs, revision.commit_hash),
                    path=path,
                    source="hf-cache",
                    size_bytes=revision.size_on_disk,
                    kind=kind_of(path, config),
                    quantization=quantization_of(config),
                    commit=revision.commit_hash,
                    refs=refs,
                )
            )
    return found


def served_id(repo_id: str, refs: tuple[str, ...], commit: str) -> str:
    if DEFAULT_REVISION in refs:
        return repo_id
    return f"{repo_id}@{refs[0] if refs else commit}"


def model_identity(path: Path) -> str:
    """The one id of the model in this folder (already resolved): a snapshot of a cached repo is
    its served id (`org/name`, `org/name@REF` or `org/name@COMMIT`, as `models list` shows it),
    any other folder its path. Every spelling of a model (a relative path, a symlink, an alias,
    the repo id or its snapshot folder) comes to this one id."""
    snapshots, repo = path.parent, path.parent.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return str(path)
    repo_id = repo.name.removeprefix("models--").replace("--", "/")
    if not _REPO_ID.fullmatch(repo_id):
        return str(path)
    refs_folder = repo / "refs"
    refs = []
    try:
        for ref in refs_folder.rglob("*"):
            if ref.is_file() and ref.read_text().strip() == path.name:
                refs.append(ref.relative_to(refs_folder).as_posix())
    except OSError:
        pass
    return served_id(repo_id, tuple(sorted(refs)), path.name)


def _folder_models(folders: list[str]) -> list[LocalModel]:
    found = []
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        candidates = [root] if (root / "config.json").exists() else sorted(p for p in root.iterdir() if p.is_dir())
        for path in candidates:
            config = read_config(path)
            if config is None or not has_weights(path):
                continue
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            path = path.resolve()
            found.append(LocalModel(str(path), path, "folder", size, kind_of(path, config), quantization_of(config)))
    return found


# -- removing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedRepo:
    """What `models rm` would delete: some revisions of one repo, or all of it."""

    repo_id: str
    folder: Path
    commits: tuple[str, ...]
    snapshots: tuple[Path, ...]
    whole_repo: bool
    size_bytes: int


def find_cached(model_ref: str) -> CachedRepo:
    """The cached revisions `org/name` (all of them) or `org/name@REVISION` names; HubError if none."""
    repo_id, revision = parse_model_ref(model_ref)
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        raise HubError(
            "not_in_cache",
            f"{repo_id} is not in the Hugging Face cache ({hf_cache_dir()})",
            "`mlx-manager models list` shows what is.",
        )
    from huggingface_hub import scan_cache_dir

    repos = scan_cache_dir(hf_cache_dir()).repos
    repo = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    revisions = sorted(repo.revisions, key=lambda r: r.commit_hash) if repo is not None else []
    if revision is not None:
        revisions = [r for r in revisions if revision in r.refs or r.commit_hash == revision]
        if not revisions:
            raise HubError(
                "not_in_cache",
                f"{repo_id} has no cached revision {revision!r}",
                "`mlx-manager models list` shows what is.",
            )
    whole = revision is None or (repo is not None and len(revisions) == len(repo.revisions))
    size = repo.size_on_disk if whole and repo is not None else sum(r.size_on_disk for r in revisions)
    if whole:  # partial downloads count too: they go with the folder
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    return CachedRepo(
        repo_id,
        folder,
        tuple(r.commit_hash for r in revisions),
        tuple(Path(r.snapshot_path) for r in revisions),
        whole,
        size,
    )


def remove_cached(target: CachedRepo) -> None:
    """Delete what `find_cached` found. A whole repo goes with its folder (unfinished pulls
    included); single revisions go through huggingface_hub, which keeps blobs others still use."""
    if target.whole_repo:
        shutil.rmtree(target.folder)
        return
    from huggingface_hub import scan_cache_dir

    scan_cache_dir(hf_cache_dir()).delete_revisions(*target.commits).execute()
