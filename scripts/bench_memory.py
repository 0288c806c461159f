"""Peak memory of captioning one batch, by images per batch and regions per image, on both backends of aoanet-infer.

Calibrates ``aoanet_runtime.features.MemoryModel`` (what batch planning bounds): each (backend, images, regions) is
run in a fresh process, and the peak of its resident memory while it decodes the batch (sampled every 2 ms) minus
its resident memory after loading the model is recorded. A full-size AoANet (rnn_size 1024, 8 heads, 2048-d
features, 6 refiner layers) with a small vocabulary (it does not change the encoder's memory), random weights,
beam 3, max length 20.

    python scripts/bench_memory.py [--work /tmp/aoanet-bench-memory] [--out artifacts/bench/infer-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V = 200
CASES = [(1, 100), (8, 100), (32, 100), (1, 400), (4, 400), (1, 1000), (2, 1000), (1, 2000)]

CHILD = r"""
import json, os, sys, threading, time
import numpy as np
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
peak = [0]
running = [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
backend, path, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
feats = np.abs(rng.standard_normal((b, n, 2048))).astype(np.float32)
masks = np.ones((b, n), np.float32)
if backend == "onnx":
    from aoanet_runtime import Captioner
    c = Captioner.from_dir(path)
    decode = lambda: c.decode(feats, masks, 3, 20)
else:
    from aoanet.infer_backend import PaddleBackend
    c = PaddleBackend(path, which="last")
    decode = lambda: c.decode(feats, masks, 3, 20)
base = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
decode()
running[0] = False
thread.join()
print(json.dumps({"base_mb": base / 2**20, "peak_mb": max(peak[0], rss()) / 2**20}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/aoanet-bench-memory"))
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "infer-memory.json")
    p.add_argument("--backends", default="onnx,paddle")
    args = p.parse_args()
    from aoanet.cpu import configure_math_library

    configure_math_library()
    from benchlib import random_export

    checkpoint, export_dir = random_export(args.work, reuse=True, vocab_size=V)
    from aoanet_runtime.features import MemoryModel

    model = MemoryModel(att_feat_size=2048, rnn_size=1024, num_heads=8)
    rows = []
    print(f"{'backend':8s} {'images':>6s} {'regions':>7s} {'peak-base MB':>12s} {'estimate MB':>11s}", flush=True)
    for backend in args.backends.split(","):
        for b, n in CASES:
            path = export_dir if backend == "onnx" else checkpoint
            # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed (loading the weights frees
            # hundreds of MB), then serves the batch from memory it kept, and the peak would not show what it needs.
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
            res = subprocess.run([sys.executable, "-c", CHILD, backend, str(path), str(b), str(n)],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{backend} {b} {n}: failed\n{res.stderr[-2000:]}", flush=True)
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            used = out["peak_mb"] - out["base_mb"]
            estimate = model.batch_bytes(b, n) / 2**20
            rows.append({"backend": backend, "images": b, "regions": n, "peak_minus_loaded_mb": round(used, 1),
                         "estimate_mb": round(estimate, 1), **out})
            print(f"{backend:8s} {b:6d} {n:7d} {used:12.1f} {estimate:11.1f}", flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    estimate = "aoanet_runtime.features.MemoryModel(2048, 1024, 8).batch_bytes(images, regions)"
    args.out.write_text(json.dumps({"cpu": model_name, "beam_size": 3, "max_length": 20, "rows": rows,
                                    "estimate": estimate}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
