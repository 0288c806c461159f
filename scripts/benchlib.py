"""What the benchmark scripts and the demo share: the machine's description and a random full-size export.

Every figure names the CPU it was measured on, and the instruction sets that decide the fp32 and int8 rates (AVX2,
FMA, AVX-512, VNNI, AMX) come with it. The speed benchmarks measure the full-size model with random weights (speed
does not depend on training): one checkpoint per work folder, exported by the current code.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

V, F, N_REGIONS = 9487, 2048, 36  # full-size vocabulary, feature width and regions per image


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> dict:
    """Vendor, family and model, and the vector instruction sets (/proc/cpuinfo; {} elsewhere)."""
    info: dict = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id" and "vendor" not in info:
            info["vendor"] = value
        elif key in ("cpu family", "model") and key not in info:
            info[key] = value
        elif key == "flags":
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx", "fma", "amx")))
            break
    return info


def machine() -> dict:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), **cpu_isa()}


def random_export(work: Path, int8: bool = False, reuse: bool = False, vocab_size: int = V) -> tuple[Path, Path]:
    """A random full-size checkpoint in ``work`` (kept between runs; ``vocab_size`` words) and its export by the
    current code (redone unless ``reuse`` and one is there): (checkpoint, export directory)."""
    import paddle

    from aoanet.model import build_model
    from aoanet.train.checkpoint import save_model_dir
    from aoanet_export import export_checkpoint

    checkpoint, export_dir = work / "checkpoint", work / "export"
    if not (checkpoint / "checkpoint.json").is_file():
        paddle.seed(0)
        model = build_model(vocab_size)
        model.eval()
        save_model_dir(checkpoint, model, {str(i): f"w{i}" for i in range(1, vocab_size + 1)})
    if not (reuse and (export_dir / "manifest.json").is_file()):
        print(f"exporting a random full-size model to {export_dir}{' (fp32 + int8)' if int8 else ''} ...", flush=True)
        export_checkpoint(checkpoint, export_dir, force=True, int8=int8)
    return checkpoint, export_dir


def rotating_rounds(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Run every contender (a callable) once per round, the order rotating between rounds, so that a drift of the
    machine's speed cannot favour one of them: seconds per contender, one per round. Ratios are taken per round."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t)
    return times


def random_decoder_feeds(rng, rows: int, images: int, regions: int, rnn_size: int, heads: int, topk: int) -> dict:
    """Random inputs of the exported decoder for ``rows`` beams over ``images`` images, asking for the ``topk``
    best words per row (docs/export-format.md)."""
    import numpy as np

    d = rnn_size // heads
    return {
        "it": rng.integers(1, V, rows).astype(np.int64),
        "state_h": rng.standard_normal((2, rows, rnn_size)).astype(np.float32),
        "state_c": rng.standard_normal((2, rows, rnn_size)).astype(np.float32),
        "mean_feats": rng.standard_normal((rows, rnn_size)).astype(np.float32),
        "att_values": rng.standard_normal((images, heads, regions, d)).astype(np.float32),
        "att_keys": rng.standard_normal((images, heads, regions, d)).astype(np.float32),
        "att_masks": np.ones((images, regions), np.float32),
        "topk": np.array([topk], np.int64),
    }
