"""Which math-library, Paddle and allocator settings suit this CPU. Nothing here runs at import: the command-line
entry points, the scripts and the test suite call ``configure_math_library()`` before Paddle is first imported,
and the training and evaluation commands ``configure_allocator()``.

Paddle's bundled MKL picks its code path by CPU vendor: on AMD CPUs it takes a slow generic path unless
``MKL_DEBUG_CPU_TYPE=5`` forces the AVX2 one, while on Intel CPUs with AVX-512 the same setting takes the fast
AVX-512 path away. So it is set on AMD CPUs only, and never over a value the user chose (docs/benchmarks.md,
"Measurements behind design choices").

Paddle's dynamic graph makes transposes and slices strided views of their input by default, and its CPU kernels
(matmul above all) run on a strided operand many times slower than on a dense one; the attention's head split is
such a transpose. ``FLAGS_use_stride_kernel=0`` makes those operations produce dense tensors (the values are the
same), on every CPU, unless the user chose a value (docs/benchmarks.md, "Training speed", item 7).
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

MKL_CPU_TYPE = "MKL_DEBUG_CPU_TYPE"
STRIDE_FLAG = "FLAGS_use_stride_kernel"


def cpu_vendor(cpuinfo: str | None = None) -> str | None:
    """'AuthenticAMD', 'GenuineIntel', ... from /proc/cpuinfo; None when unknown (not Linux, not x86)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip() or None
    return None


def configure_math_library(environ=None, cpuinfo: str | None = None) -> dict:
    """Set ``MKL_DEBUG_CPU_TYPE=5`` on AMD CPUs and ``FLAGS_use_stride_kernel=0`` everywhere, each unless already
    set; returns what was set ({} when nothing). Paddle reads both when it is first imported."""
    environ = os.environ if environ is None else environ
    chosen = {}
    if STRIDE_FLAG not in environ:
        chosen[STRIDE_FLAG] = "0"
    if MKL_CPU_TYPE not in environ and cpu_vendor(cpuinfo) == "AuthenticAMD":
        chosen[MKL_CPU_TYPE] = "5"
    environ.update(chosen)
    return chosen


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_FREED_BYTES = 1 << 30
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def configure_allocator(environ=None) -> dict:
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    Paddle's CPU tensors come from malloc, and glibc serves every large block (the full-size model's
    log-probabilities, its embedding and output-layer gradients) with a fresh mmap: each such tensor costs thousands
    of page faults, more than the arithmetic done on it. With mmap off (``M_MMAP_MAX`` 0) and a high trim
    threshold, freed blocks are reused; the peak memory is unchanged (docs/benchmarks.md, "Training speed").
    Left alone when the user set glibc's own malloc variables. Returns what was set ({} when nothing).
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in GLIBC_MALLOC_ENV) or platform.libc_ver()[0] != "glibc":
        return {}
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return {}
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES) != 1:
        return {}
    return {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": KEEP_FREED_BYTES}
