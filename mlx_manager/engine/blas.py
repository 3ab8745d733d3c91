"""An optimised BLAS for MLX on Linux.

The mlx-cpu wheels for Linux link MLX against the reference BLAS (netlib), whose matrix products
run 10 to 40 times slower than an optimised library's on the same CPU; they are most of the
time of a prompt's prefill and of an embedding batch. MLX calls the standard CBLAS functions
(`cblas_sgemm`...), so a library that exports them and is loaded with RTLD_GLOBAL is found by the
dynamic linker before the bundled one: MLX's calls then go to it. This must happen before MLX
runs its first matrix product (the wheel binds its symbols lazily, on first call).

Where it comes from: the system's OpenBLAS (Debian/Ubuntu `libopenblas0`, Fedora `openblas`),
which the README tells Linux users to install, is found first; MKL or an OpenBLAS vendored into a
wheel (opencv-python's, which the `embeddings` extra brings) are used when there is no system one.
PyPI has no lean wheel of a CBLAS this can load: scipy-openblas32 prefixes its symbols
(`scipy_cblas_sgemm`), and the unprefixed OpenBLAS wheels (cmeel-openblas, ngsolve-openblas) need
the system's libgfortran, i.e. the same apt-get as libopenblas0.

A candidate is used only after a small `cblas_sgemm` through ctypes gives the right answer with
32-bit integer arguments (the interface MLX was built for), so a library with another interface
(64-bit integers, prefixed names) is never loaded globally.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import site
import sys
from pathlib import Path

log = logging.getLogger("mlx_manager.engine")

AUTO, BUNDLED = "auto", "bundled"
_chosen: list[str | None] = []  # what the first call chose: the choice holds for the process


def candidates() -> list[str]:
    """Optimised BLAS libraries on this machine, best first: the system's, then pip-installed ones."""
    found: list[str] = []
    for name in ("openblas", "mkl_rt", "blis"):
        path = _system_library(name)
        if path:
            found.append(path)
    folders = [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    folders.append(Path(sys.prefix) / "lib")
    for folder in folders:
        found += sorted(glob.glob(str(folder / "libmkl_rt.so*")))
        # Copies vendored into wheels by auditwheel (e.g. opencv-python's, from the `embeddings` extra).
        found += sorted(glob.glob(str(folder / "*.libs" / "libopenblas*.so*")))
    return list(dict.fromkeys(found))


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _system_library(name: str) -> str | None:
    """The file of the system's library `name` that exports cblas_sgemm (find_library gives only a
    soname, e.g. libopenblas.so.0; the file, symlinks resolved, is what the process maps)."""
    soname = ctypes.util.find_library(name)
    if not soname:
        return None
    try:
        symbol = ctypes.cast(ctypes.CDLL(soname).cblas_sgemm, ctypes.c_void_p)
    except (OSError, AttributeError):
        return None
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(symbol, ctypes.byref(info)) or not info.dli_fname:
        return soname
    return os.path.realpath(info.dli_fname.decode())


def works(path: str) -> bool:
    """True if the library at `path` exports cblas_sgemm with the LP64 interface and computes right."""
    try:
        sgemm = ctypes.CDLL(path).cblas_sgemm
    except (OSError, AttributeError):
        return False
    floats = ctypes.c_float * 6
    a = floats(1, 2, 3, 4, 5, 6)  # 2x3, row-major
    b = floats(7, 8, 9, 10, 11, 12)  # 3x2
    c = floats(0, 0, 0, 0)
    row_major, no_trans = 101, 111
    i, f = ctypes.c_int, ctypes.c_float
    sgemm.restype = None
    sgemm(i(row_major), i(no_trans), i(no_trans), i(2), i(2), i(3), f(1.0), a, i(3), b, i(2), f(0.0), c, i(2))
    return list(c)[:4] == [58.0, 64.0, 139.0, 154.0]


def use(choice: str = AUTO) -> str | None:
    """Load the BLAS `choice` names ("auto", "bundled" or a library path) for MLX; the path used, or
    None for MLX's bundled BLAS. Only the first call in a process acts (a library cannot be unloaded)."""
    if _chosen:
        return _chosen[0]
    # OpenBLAS's threads spin after each product for about 2^28 cycles before they sleep: about
    # 0.1 s of a core burnt after every matrix product, which the daemon's event loop and other
    # processes needed. Measured on the conversation workload (benchmarks/conversation_steps.py):
    # 30 s of CPU down to 19 s, tokens/s unchanged or better. 4 (2^4 cycles) is its least; it is
    # read when the library loads (candidates() and works() load it). A user's own value is kept.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    path = _select(choice)
    if path is not None:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        log.info("MLX matrix products use the BLAS at %s", path)
    _chosen.append(path)
    return path


def _select(choice: str) -> str | None:
    if choice == BUNDLED or not sys.platform.startswith("linux"):
        return None  # macOS: MLX uses Accelerate and Metal
    if choice != AUTO:
        if works(choice):
            return choice
        log.warning("blas: %s does not provide a working cblas_sgemm; using MLX's bundled BLAS", choice)
        return None
    for path in candidates():
        if works(path):
            return path
    log.warning(
        "no optimised BLAS found: MLX uses its bundled reference BLAS (prompts about 5x slower);"
        " install the system's OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0; Fedora: dnf install openblas)"
    )
    return None
