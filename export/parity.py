"""Parity of the export: Paddle dynamic graph vs Paddle static graph (paddle.inference) vs onnxruntime.

Each backend encodes the same random features and runs ``steps`` chained decoder steps from the zero
state, carrying its own state and encoder outputs forward; all three are fed the same tokens (the argmax of
the dynamic graph's log-probs, BOS first), so differences accumulate as in a real decode. The cases cover one
region, full and ragged masks, a batch larger than the others, and beams: ``beams`` image-major decoder rows
per image, fed the image's memory once (as the runtime's beam search does), while the dynamic graph gets it
repeated per row (the per-row form); beam j of an image is fed the dynamic graph's j-th best token. The
export fails when the log-probs of either backend differ from the dynamic graph by more than
``LOGPROB_TOLERANCE`` (max absolute difference), or their attention weights by more than ``ATTENTION_TOLERANCE``;
the other outputs are reported. The ONNX decoder's candidate head (top-k words by log-prob) must equal, exactly,
numpy's top-k (stable descending sort) of the same graph's log-probs at every step of every case.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from aoanet.model import AoAModel
from aoanet_export.static import StaticFiles, StaticPredictor
from aoanet_runtime.contract import ATTENTION_OUTPUT, DECODER_OUTPUTS, ENCODER_OUTPUTS, HEAD_OUTPUTS

LOGPROB_TOLERANCE = 1e-4
# The attention weights (probabilities, 0..1) are gated too: they are what the pictures of aoanet-infer --attention
# show, and a graph that computed them wrongly would still give the right log-probs only by accident.
ATTENTION_TOLERANCE = 1e-4
STEPS = 20
CANDIDATES_K = 4  # what a beam search of 3 fetches (K + 1, for the UNK penalty)


@dataclass(frozen=True)
class Case:
    batch: int
    regions: int
    ragged: bool  # rows get between 1 and `regions` valid regions (the first row all of them)
    beams: int = 1  # decoder rows per image

    def to_json(self) -> dict:
        return {"batch": self.batch, "regions": self.regions, "ragged": self.ragged, "beams": self.beams}

    @property
    def rows(self) -> int:
        return self.batch * self.beams


# (1, 1): a single region; then a batch larger than the others with many regions, and beams.
DEFAULT_CASES = (
    Case(1, 1, False),
    Case(2, 5, False),
    Case(3, 10, True),
    Case(16, 37, True),
    Case(4, 12, True, beams=3),
)

STEP_OUTPUTS = (*DECODER_OUTPUTS, ATTENTION_OUTPUT)
OUTPUTS = (*ENCODER_OUTPUTS, *STEP_OUTPUTS)
BACKENDS = ("static", "onnx")


def random_inputs(rng: np.random.Generator, case: Case, att_feat_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Bottom-up region features are non-negative (post-ReLU); a half-normal has their rough scale.
    feats = np.abs(rng.standard_normal((case.batch, case.regions, att_feat_size))).astype(np.float32)
    lengths = np.full(case.batch, case.regions)
    if case.ragged:
        lengths[1:] = rng.integers(1, case.regions + 1, size=case.batch - 1)
    masks = (np.arange(case.regions)[None, :] < lengths[:, None]).astype(np.float32)
    return feats, masks


class DynamicBackend:
    """The reference: the model's own ``encode`` and ``step`` (which takes p_att_feats, not the head layout)."""

    def __init__(self, model: AoAModel):
        self.model = model

    @paddle.no_grad()
    def encode(self, feats, masks):
        mean, p_att = self.model.encode(paddle.to_tensor(feats), paddle.to_tensor(masks))
        values, keys = self.model.core.split_memory(p_att)
        return mean.numpy(), p_att.numpy(), values.numpy(), keys.numpy()

    @paddle.no_grad()
    def step(self, it, h, c, mean, encoded, masks):
        t = paddle.to_tensor
        lp, (h, c), att = self.model.step(t(it), (t(h), t(c)), t(mean), t(encoded[1]), t(masks), True)
        return lp.numpy(), h.numpy(), c.numpy(), att.numpy()


def decoder_feeds(it, h, c, mean, encoded, masks) -> dict:
    """The decoder's inputs by their contract names (the same for paddle.inference and onnxruntime), from the
    encoder's outputs ``encoded``."""
    values, keys = encoded[2], encoded[3]
    return {
        "it": it,
        "state_h": h,
        "state_c": c,
        "mean_feats": mean,
        "att_values": values,
        "att_keys": keys,
        "att_masks": masks,
    }


class StaticBackend:
    def __init__(self, encoder: StaticFiles, decoder: StaticFiles, threads: int = 1):
        self.encoder, self.decoder = StaticPredictor(encoder, threads), StaticPredictor(decoder, threads)

    def encode(self, feats, masks):
        return tuple(self.encoder({"att_feats": feats, "att_masks": masks}))

    def step(self, it, h, c, mean, encoded, masks):
        return tuple(self.decoder(decoder_feeds(it, h, c, mean, encoded, masks)))


def onnx_session(path: Path, threads: int = 1):
    """A CPU session with the runtime's own session options, so the graphs are checked as the runtime runs them
    (among them: int8 without u8 x s8 saturation on x86 CPUs without VNNI)."""
    import onnxruntime as ort

    from aoanet_runtime.sessions import CPU, session_options

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=[CPU])


class OnnxBackend:
    """The ONNX graphs; every step also checks the decoder's candidate head against numpy (``candidates``)."""

    def __init__(self, encoder: Path, decoder: Path, threads: int = 1):
        from aoanet_runtime.sessions import has_input

        self.encoder, self.decoder = onnx_session(encoder, threads), onnx_session(decoder, threads)
        self.head = has_input(self.decoder, "topk")
        self.candidates = {"k": CANDIDATES_K, "rows": 0, "mismatched_rows": 0} if self.head else None

    def encode(self, feats, masks):
        return tuple(self.encoder.run(list(ENCODER_OUTPUTS), {"att_feats": feats, "att_masks": masks}))

    def step(self, it, h, c, mean, encoded, masks):
        outputs = list(STEP_OUTPUTS)
        feeds = decoder_feeds(it, h, c, mean, encoded, masks)
        if not self.head:
            return tuple(self.decoder.run(outputs, feeds))
        feeds["topk"] = np.array([CANDIDATES_K], np.int64)
        lp, h, c, att, raw, ids = self.decoder.run(outputs + list(HEAD_OUTPUTS), feeds)
        k = min(CANDIDATES_K, lp.shape[1])
        want = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        ok = (ids == want).all(axis=1) & (raw == np.take_along_axis(lp, want, axis=1)).all(axis=1)
        self.candidates["rows"] += int(ok.size)
        self.candidates["mismatched_rows"] += int(ok.size - ok.sum())
        return lp, h, c, att


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("inf") if not np.all(np.isfinite(d)) else float(d.max(initial=0.0))


def compare(reference, backends: dict, case: Case, feats, masks, steps: int = STEPS) -> dict:
    """Run one case through the reference and every backend; max abs differences per backend and output."""
    diffs = {name: dict.fromkeys(OUTPUTS, 0.0) for name in backends}
    agree = dict.fromkeys(backends, 0)

    def record(name, output, a, b):
        diffs[name][output] = max(diffs[name][output], _max_abs(a, b))

    ref_enc = reference.encode(feats, masks)
    encs = {}
    for name, backend in backends.items():
        encs[name] = backend.encode(feats, masks)
        for output, a, b in zip(ENCODER_OUTPUTS, encs[name], ref_enc, strict=True):
            record(name, output, a, b)

    k, rows = case.beams, case.rows
    zeros = np.zeros((2, rows, ref_enc[0].shape[1]), np.float32)
    ref_state = (zeros, zeros)
    states = dict.fromkeys(backends, (zeros, zeros))
    ref_mem = tuple(np.repeat(x, k, axis=0) for x in ref_enc)
    ref_masks = np.repeat(masks, k, axis=0)
    rank = np.arange(rows) % k
    it = np.zeros(rows, np.int64)  # BOS
    for _ in range(steps):
        ref_lp, *ref_state, ref_att = reference.step(it, *ref_state, ref_mem[0], ref_mem, ref_masks)
        for name, backend in backends.items():
            enc = encs[name]
            lp, h, c, att = backend.step(it, *states[name], np.repeat(enc[0], k, axis=0), enc, masks)
            states[name] = (h, c)
            for output, a, b in zip(STEP_OUTPUTS, (lp, h, c, att), (ref_lp, *ref_state, ref_att), strict=True):
                record(name, output, a, b)
            agree[name] += int((lp.argmax(axis=1) == ref_lp.argmax(axis=1)).sum())
        it = np.argsort(-ref_lp, axis=1, kind="stable")[np.arange(rows), rank].astype(np.int64)
    return {
        **case.to_json(),
        "lengths": masks.sum(axis=1).astype(int).tolist(),
        "max_abs_diff": diffs,
        "argmax_agreement": {name: agree[name] / (steps * rows) for name in backends},
    }


def run_parity(
    model: AoAModel,
    static: dict[str, StaticFiles],
    onnx_files: dict[str, Path],
    cases=DEFAULT_CASES,
    steps: int = STEPS,
    seed: int = 0,
    tolerance: float = LOGPROB_TOLERANCE,
    threads: int | None = None,
    attention_tolerance: float = ATTENTION_TOLERANCE,
) -> dict:
    """The parity report (JSON-ready); ``report["passed"]``: are the log-probs within ``tolerance`` and the
    attention weights within ``attention_tolerance``?"""
    start = time.perf_counter()
    model.eval()
    reference = DynamicBackend(model)
    threads = threads or min(os.cpu_count() or 1, 4)
    backends = {
        "static": StaticBackend(static["encoder"], static["decoder"], threads),
        "onnx": OnnxBackend(onnx_files["encoder"], onnx_files["decoder"], threads),
    }
    rng = np.random.default_rng(seed)
    results = []
    for case in cases:
        feats, masks = random_inputs(rng, case, model.options.att_feat_size)
        results.append(compare(reference, backends, case, feats, masks, steps))
    overall = {
        name: {out: max(r["max_abs_diff"][name][out] for r in results) for out in OUTPUTS}
        for name in backends
    }
    # Gate on the log-probs (what decoding sees); a non-finite figure (NaN, wrong shape) anywhere fails too.
    candidates = backends["onnx"].candidates
    passed = (
        all(overall[name]["logprobs"] <= tolerance for name in backends)
        and all(overall[name][ATTENTION_OUTPUT] <= attention_tolerance for name in backends)
        and all(np.isfinite(v) for figures in overall.values() for v in figures.values())
        and (candidates is None or candidates["mismatched_rows"] == 0)
    )
    return {
        "passed": passed,
        "reference": "paddle dynamic graph",
        "backends": {"static": "paddle.inference", "onnx": "onnxruntime CPUExecutionProvider"},
        "tolerance": {"logprobs": tolerance, ATTENTION_OUTPUT: attention_tolerance},
        "steps": steps,
        "seed": seed,
        # The gated figure: the worst log-prob difference of any backend from the dynamic graph.
        "max_abs_diff_logprobs": max(overall[name]["logprobs"] for name in backends),
        "max_abs_diff_attention": max(overall[name][ATTENTION_OUTPUT] for name in backends),
        "max_abs_diff": overall,
        "min_argmax_agreement": {
            name: min(r["argmax_agreement"][name] for r in results) for name in backends
        },
        # The ONNX decoder's candidate head vs numpy's top-k of its log-probs (must be 0 mismatched rows).
        "candidates": candidates,
        "cases": results,
        "seconds": round(time.perf_counter() - start, 3),
    }


def summary(report: dict) -> dict:
    """The figures kept in the manifest (parity.json has the per-case details)."""
    keys = (
        "passed", "tolerance", "steps", "max_abs_diff_logprobs", "max_abs_diff_attention", "max_abs_diff",
        "min_argmax_agreement", "candidates",
    )
    return {**{k: report[k] for k in keys}, "cases": [[c["batch"], c["regions"], c["beams"]] for c in report["cases"]]}


def describe(report: dict) -> str:
    lines = []
    for name in report["max_abs_diff"]:
        figures = ", ".join(f"{out} {v:.2e}" for out, v in report["max_abs_diff"][name].items())
        lines.append(f"{name} vs dynamic: {figures}")
    candidates = report.get("candidates")
    if candidates:
        lines.append(
            f"onnx candidate head: {candidates['mismatched_rows']} of {candidates['rows']} rows differ from numpy's "
            f"top-{candidates['k']}"
        )
    return "; ".join(lines)
