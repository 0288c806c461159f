"""Benchmark of aoanet-serve: images/s and latency of the HTTP service at several client concurrencies, side by side
with the offline Captioner on the same inputs, in one run.

Full-size AoANet with random weights (scripts/benchlib.py), region features of 36 x 2048 per
request (.npy bodies), beam 3. The service runs on a local Ray instance, one replica with all CPUs, Serve's request
batching up to ``--max-batch-size`` with ``--batch-wait-ms``; the clients are threads of this process on 127.0.0.1.
For each concurrency: images/s, latency p50/p95, the mean and largest batch the service reached, and the ratio to
the offline batched throughput (the ceiling: the same captioner without HTTP, Ray or waiting for requests). The
offline run and the service at every concurrency are measured in ``--rounds`` interleaved rounds, a ratio per
round (median and range reported), so that a change in the machine's load cannot bias them. The service's captions
must equal the offline ones. Writes artifacts/bench/serve.json and prints a table.

    python scripts/bench_serve.py [--requests 100] [--concurrency 1,8,32] [--rounds 3] [--work /tmp/aoanet-bench-infer]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[float, dict]:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - start, answer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime threads (both sides)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/aoanet-bench-infer"))
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "serve.json")
    args = p.parse_args()

    from aoanet.cpu import configure_math_library

    configure_math_library()  # the export below runs Paddle
    from benchlib import N_REGIONS, F, cpu_isa, cpu_name, random_export

    _, export_dir = random_export(args.work, int8=True)

    from aoanet_runtime import Captioner, serve

    rng = np.random.default_rng(0)
    feats = [np.abs(rng.standard_normal((N_REGIONS, F))).astype(np.float32)
             for _ in range(args.requests)]
    bodies = []
    for f in feats:
        buf = io.BytesIO()
        np.save(buf, f)
        bodies.append(buf.getvalue())

    load_before = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine bias absolute figures
    threads = args.threads
    captioner = Captioner.from_dir(export_dir, threads=threads)
    captioner.caption(feats[:2], beam_size=args.beam_size)  # warm-up

    serve.start_ray(None)
    port = free_port()
    limits = serve.Limits(max_request_bytes=max(len(b) for b in bodies) + 1024)
    serve.run_service(export_dir, port=port, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                      limits=limits, threads=threads, cpus_per_replica=threads, request_timeout_s=600,
                      blocking=False)
    url = f"http://127.0.0.1:{port}/v1/captions?beam_size={args.beam_size}"
    post(url, bodies[0])  # warm-up
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    offline_rates, measured = [], {c: [] for c in concurrencies}
    offline = None
    for _ in range(args.rounds):
        # The offline run and the service in turn: the service's replica is idle while the offline captioner
        # runs in this process, and the other way round.
        start = time.perf_counter()
        offline = captioner.caption(feats, beam_size=args.beam_size, batch_size=args.max_batch_size)
        offline_rates.append(len(feats) / (time.perf_counter() - start))
        for concurrency in concurrencies:
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda b: post(url, b), bodies))
            measured[concurrency].append((time.perf_counter() - start, results))
    rows = []
    for concurrency in concurrencies:
        ratios = [len(bodies) / seconds / rate for (seconds, _), rate in zip(measured[concurrency], offline_rates,
                                                                              strict=True)]
        latencies = np.array([t for _, results in measured[concurrency] for t, _ in results])
        batches = np.array([a["batch_size"] for _, results in measured[concurrency] for _, a in results])
        equal = [a["caption"] == c for _, results in measured[concurrency]
                 for (_, a), c in zip(results, offline.captions, strict=True)]
        rates = [len(bodies) / seconds for seconds, _ in measured[concurrency]]
        rows.append({
            "concurrency": concurrency,
            "images_per_s": round(float(np.median(rates)), 2),
            "vs_offline": round(float(np.median(ratios)), 3),
            "vs_offline_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
            "mean_batch": round(float(batches.mean()), 2),
            "max_batch": int(batches.max()),
            "captions_equal_offline": sum(equal) / len(equal),
        })
    offline_rate = float(np.median(offline_rates))
    from ray import serve as ray_serve

    ray_serve.shutdown()
    import ray

    ray.shutdown()

    report = {
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "load_average_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "model": "full-size AoANet, random weights (R=1024, 2048-d features, vocabulary 9,487)",
        "inputs": f"{args.requests} requests of 36 x 2048 region features (.npy), beam {args.beam_size}",
        "service": {"replicas": 1, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                    "threads": threads},
        "rounds": args.rounds,
        "offline_images_per_s": round(offline_rate, 2),
        "offline_images_per_s_rounds": [round(r, 2) for r in offline_rates],
        "by_concurrency": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['cpu']}, {report['cores']} cores; offline Captioner, batched: {offline_rate:.2f} images/s")
    print(f"(medians of {args.rounds} interleaved rounds)")
    print(f"{'clients':>8} {'images/s':>9} {'vs offline':>10} {'p50 s':>7} {'p95 s':>7} {'batch':>6} {'max':>4}"
          f" {'= offline':>9}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['images_per_s']:>9.2f} {r['vs_offline']:>10.3f} {r['latency_p50_s']:>7.3f} "
              f"{r['latency_p95_s']:>7.3f} {r['mean_batch']:>6.2f} {r['max_batch']:>4} "
              f"{r['captions_equal_offline']:>9.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
