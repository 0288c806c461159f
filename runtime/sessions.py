"""onnxruntime sessions as the runtime runs them: threads, spinning, execution providers, int8 kernels.

Everything that creates a session on an exported graph (the captioner, the export's parity check, the benchmarks)
takes its options from ``session_options`` so that the graphs are checked and measured the way they are run.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

__all__ = [
    "CPU", "CUDA", "choose_providers", "cpu_has_int8_dot", "default_threads", "int8_session_entries", "session_options",
]

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

# Spinning off: on the 2-core machines measured, all cores without spinning was the fastest setting, and on a
# loaded machine a spinning thread steals the core that numpy's search and other processes need between runs
# (docs/benchmarks.md, "onnxruntime session options").
DEFAULT_SPINNING = False

# On x86 CPUs without VNNI, onnxruntime's u8 x s8 kernel adds pairs of products in 16 bits, which saturate when both
# factors are large, and int8 captions drift far from fp32's. With this option onnxruntime converts the int8
# weights to uint8 at session creation and runs its u8 x u8 kernel, which does not saturate. onnxruntime applies it
# on every x86 CPU with AVX2 (its test is that the u8 x s8 and u8 x u8 kernel tables differ), VNNI and AMX ones
# included, where the u8 x s8 products are exact already (32-bit sums) and the u8 x u8 kernel has neither VNNI nor
# AMX: so it is set only where the CPU has no int8 dot product (docs/int8.md, docs/benchmarks.md).
INT8_PRECISION_OPTION = ("session.x64quantprecision", "1")
# x86 instruction sets with int8 dot products (/proc/cpuinfo flags): what makes the int8 graphs fast.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

_notified_cpu = False
_notified_int8 = False


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def int8_session_entries(cpuinfo: str | None = None) -> dict:
    """The session entries the int8 graphs need on this CPU: the u8 x u8 kernels where u8 x s8 would saturate
    (no int8 dot product, or unknown); none on CPUs with VNNI or AMX, whose u8 x s8 kernels are exact."""
    has_dot = cpu_has_int8_dot() if cpuinfo is None else cpu_has_int8_dot(cpuinfo)
    return {} if has_dot else dict([INT8_PRECISION_OPTION])


def session_options(
    threads: int | None = None, spinning: bool | None = None, cpuinfo: str | None = None
) -> ort.SessionOptions:
    """``cpuinfo``: the text of /proc/cpuinfo that decides the int8 entries (read when None)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or default_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = DEFAULT_SPINNING if spinning is None else bool(spinning)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    for key, value in int8_session_entries(cpuinfo).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3  # errors only
    return options


def cpu_has_int8_dot(cpuinfo: str | None = None) -> bool | None:
    """Has this x86 CPU int8 dot-product instructions (VNNI)? None when unknown (not x86, no /proc/cpuinfo).

    ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return None
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in INT8_DOT_FLAGS)
    return None


def notify_slow_int8() -> None:
    """A one-line notice (once per process) when the int8 graphs run on an x86 CPU without VNNI."""
    global _notified_int8
    if _notified_int8 or cpu_has_int8_dot() is not False:
        return
    _notified_int8 = True
    log.warning(
        "aoanet runtime: this CPU has no int8 dot-product instructions (VNNI): the int8 graphs gain little over "
        "fp32 here and their captions may differ more (docs/int8.md)"
    )


def choose_providers(providers: Sequence[str] | None) -> list[str]:
    """CUDA when onnxruntime has it (CPU as fallback for unsupported ops), else CPU with a one-line notice."""
    global _notified_cpu
    available = ort.get_available_providers()
    if providers is not None:
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(f"execution provider(s) {unknown} not available; onnxruntime has {available}")
        return list(providers)
    if CUDA in available:
        return [CUDA, CPU]
    if not _notified_cpu:
        log.warning("aoanet runtime: no CUDAExecutionProvider in this onnxruntime, running on the CPU")
        _notified_cpu = True
    return [CPU]


def has_input(session, name: str) -> bool:
    """Does the session take the input ``name``? (an optional input with a default is listed by onnxruntime as an
    overridable initializer; a session-like object without these methods, e.g. a Paddle predictor, has none)"""
    if not hasattr(session, "get_inputs"):
        return False
    names = {i.name for i in session.get_inputs()}
    if hasattr(session, "get_overridable_initializers"):
        names |= {i.name for i in session.get_overridable_initializers()}
    return name in names


def has_output(session, name: str) -> bool:
    """Does the session have the output ``name``? (False for a session-like object without ``get_outputs``)"""
    if not hasattr(session, "get_outputs"):
        return False
    return name in {o.name for o in session.get_outputs()}
