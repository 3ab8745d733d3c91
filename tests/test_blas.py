"""The optimised BLAS for MLX on Linux (mlx_manager/engine/blas.py), in fresh processes."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from mlx_manager.engine import blas
from mlx_manager.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

# Runs in a fresh process: the choice holds for a whole process, and MLX must not have multiplied yet.
PROBE = """
import json, sys
import numpy as np
from mlx_manager.engine import blas
path = blas.use(sys.argv[1])
import mlx.core as mx
a = np.random.default_rng(0).standard_normal((300, 200), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((200, 100), dtype=np.float32)
product = np.array(mx.array(a) @ mx.array(b))
maps = open("/proc/self/maps").read()
print(json.dumps({"path": path, "error": float(abs(product - a @ b).max()), "mapped": bool(path) and path in maps}))
"""


def probe(choice: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, choice], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_auto_finds_an_optimised_blas_and_mlx_uses_it():
    result = probe("auto")
    assert result["path"] and any(word in result["path"].lower() for word in ("blas", "mkl"))
    assert result["mapped"] and result["error"] < 1e-3


def test_a_base_install_gets_the_system_openblas_first():
    # The base install brings no BLAS (opencv-python's vendored OpenBLAS comes with the `embeddings`
    # extra, which the tests have): the README's Linux set-up installs the system's OpenBLAS
    # (Debian's libopenblas0, as .ci/run does), and auto picks it before anything in site-packages.
    assert ctypes.util.find_library("openblas"), "no system OpenBLAS: `apt-get install libopenblas0` (see the README)"
    system = blas.candidates()[0]
    assert "openblas" in system and not system.startswith(sys.prefix) and blas.works(system)
    result = probe("auto")
    assert result["path"] == system and result["mapped"] and result["error"] < 1e-3


SPIN = """
import json, os, sys, time
from mlx_manager.engine import blas
blas.use("auto")
import mlx.core as mx
a = mx.random.normal((512, 512))
mx.eval(a)
idle = []
for _ in range(3):
    mx.eval(a @ a)
    started = time.process_time()
    time.sleep(0.2)
    idle.append(time.process_time() - started)
print(json.dumps({"timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"), "idle_cpu": max(idle)}))
"""


@pytest.mark.parametrize("users", [None, "6"])
def test_openblas_threads_sleep_after_a_product_instead_of_spinning(users):
    """OpenBLAS's worker threads spun about 0.1 s of CPU after every product by default (seen as
    0.11 s of CPU in 0.2 s of idling); the engine tells them to sleep at once, unless the user set
    OPENBLAS_THREAD_TIMEOUT."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if users:
        env["OPENBLAS_THREAD_TIMEOUT"] = users
    done = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["timeout"] == (users or "4")
    if users is None:
        assert result["idle_cpu"] < 0.02, result


def test_bundled_keeps_mlx_own_blas():
    result = probe("bundled")
    assert result == {"path": None, "error": result["error"], "mapped": False} and result["error"] < 1e-3


def test_an_explicit_library_is_used():
    path = next(p for p in blas.candidates() if blas.works(p))
    assert probe(path)["path"] == path


def test_libraries_without_a_working_cblas_sgemm_are_refused(tmp_path):
    assert not blas.works(ctypes.util.find_library("c"))  # no cblas_sgemm at all
    assert not blas.works(str(tmp_path / "missing.so"))
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    assert not blas.works(str(junk))
    result = probe(ctypes.util.find_library("m"))
    assert result["path"] is None and result["error"] < 1e-3  # MLX's own BLAS, with a warning


def test_the_setting_takes_auto_bundled_or_an_existing_file(tmp_path):
    assert Settings().server.blas == "auto"
    assert load_settings({"server.blas": "bundled"}).server.blas == "bundled"
    with pytest.raises(SettingsError, match="server.blas"):
        load_settings({"server.blas": str(tmp_path / "no-such-lib.so")})


def test_the_daemon_imports_no_mlx_before_the_engine_chooses_the_blas():
    # MLX binds its matrix products when mlx.core is first imported: imported earlier than
    # Engine.__init__'s blas.use(), it keeps its bundled reference BLAS (5x slower prompts here).
    # So nothing the daemon imports at module level may import MLX (or mlx-lm, which imports it).
    code = (
        "import json, sys\n"
        "import mlx_manager.daemon.run, mlx_manager.daemon.app\n"
        "import mlx_manager.engine.engine, mlx_manager.engine.worker, mlx_manager.engine.batch\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
