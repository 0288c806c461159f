"""Which math-library settings suit this CPU. Nothing here runs at import: the command-line entry points, the
scripts and the test suite call ``configure_math_library()`` before Paddle is first imported.

Paddle's bundled MKL picks its code path by CPU vendor: on AMD CPUs it takes a slow generic path unless
``MKL_DEBUG_CPU_TYPE=5`` forces the AVX2 one, while on Intel CPUs with AVX-512 the same setting takes the fast
AVX-512 path away. So it is set on AMD CPUs only, and never over a value the user chose (docs/benchmarks.md,
"Measurements behind design choices").
"""

from __future__ import annotations

import os
from pathlib import Path

MKL_CPU_TYPE = "MKL_DEBUG_CPU_TYPE"


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
    """Set ``MKL_DEBUG_CPU_TYPE=5`` on AMD CPUs unless already set; returns what was set ({} when nothing)."""
    environ = os.environ if environ is None else environ
    if MKL_CPU_TYPE in environ or cpu_vendor(cpuinfo) != "AuthenticAMD":
        return {}
    environ[MKL_CPU_TYPE] = "5"
    return {MKL_CPU_TYPE: "5"}
