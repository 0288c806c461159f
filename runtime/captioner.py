"""Captioning with the exported graphs and onnxruntime: ``Captioner.from_dir(EXPORT_DIR).caption(feats)``.

The encoder runs once per batch of images; the decoder runs once per step over every live beam of the whole
batch, driven by the shared numpy search (``runtime.beam``) exactly as ``AoAModel.decode`` drives the Paddle
model: rows image-major (row ``b * K + k`` is beam ``k`` of image ``b``), mean_feats repeated K times, the
memory (keys and values in head layout, mask) once per image for its K beams, zero state, BOS (0) first;
``beam_size == 1`` with ``greedy_unk`` is greedy decoding. Same inputs and weights, same captions, whichever
backend.

Imports numpy and onnxruntime only (never paddle, never the training package).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.beam import Candidates, DecodeResult, is_greedy, search
from runtime.features import FeatureError, batch_plan, pad_batch
from runtime.vocab import bad_ending_ids, decode_sequence

__all__ = ["Captioner", "Captions", "ExportDirError", "FeatureError", "load_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 2: the decoder takes keys/values in head layout, a row per image; 3: and it has the candidate head
FORMAT_VERSIONS = (2, 3)
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
# The graphs of each precision; the int8 ones are optional in an export (aoanet-export --int8).
MODEL_FILES = {"fp32": (ENCODER, DECODER), "int8": ("encoder.int8.onnx", "decoder.int8.onnx")}
PRECISIONS = tuple(MODEL_FILES)
# The encoder's outputs the decoder needs: keys/values already in the decoder attention's head layout
# [B, heads, N, d_k] (the encoder also outputs p_att_feats [B, N, 2R], the model's own form).
ENCODER_OUTPUTS = ["mean_feats", "att_values", "att_keys"]
MEMORY = ("att_values", "att_keys", "att_masks")  # a row per image, shared by the image's beams
DECODER_OUTPUTS = ["logprobs", "next_state_h", "next_state_c"]
# The decoder's candidate head (format 3, export.onnx_convert.add_candidate_head): each row's top-k words by
# log-prob, fetched instead of the log-probs when the search needs no other value.
HEAD_INPUTS = ("topk",)
CANDIDATE_OUTPUTS = ["cand_ids", "cand_logprobs", "next_state_h", "next_state_c"]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

# Measured with scripts/bench_infer.py (full-size model, batch 50, beam 3) on a 2-core CPU: intra-op threads = all
# cores with spinning OFF is the fastest (22.7-23.0 images/s; spinning ON 20.2-21.7; one thread 12.1-12.5). On a loaded
# machine spinning ON is far worse (2 threads 2x slower than 1): a spinning thread steals the core that numpy's
# search bookkeeping, other sessions and other processes need between runs.
DEFAULT_SPINNING = False

# The int8 graphs on x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI): there onnxruntime's u8 x s8 kernel
# adds pairs of products in 16 bits, which saturate when both factors are large, and captions drift far from
# fp32's. With this session option onnxruntime converts the int8 weights to uint8 when the session is created and
# runs its u8 x u8 kernel, which does not saturate; it does so only on such CPUs (onnxruntime checks the CPU: with
# VNNI, and on other architectures, nothing changes) and only for quantized weights (the fp32 graphs are unchanged).
# Measured on the 2-core AMD EPYC 7002 (Zen 2, AVX2, no VNNI) here, int8 captions equal to fp32's: full-size model,
# 100 images, beam 3: 55% -> 88% (same speed, 23-24 images/s); the test model: 20% -> 72%.
INT8_PRECISION_OPTION = ("session.x64quantprecision", "1")
# x86 instruction sets with int8 dot products (/proc/cpuinfo flags): what makes the int8 graphs fast.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

_notified_cpu = False
_notified_int8 = False


class ExportDirError(RuntimeError):
    """An export directory the runtime refuses: missing or unreadable manifest, unknown format version,
    missing or tampered model file (the message names the file)."""


@dataclass
class Captions:
    """One entry per image, in input order.

    captions: the words up to the first EOS (``runtime.vocab.decode_sequence``).
    scores: float64 [B], the search's score (see ``runtime.beam.DecodeResult``).
    seqs: int64 [B, max_length]; logprobs: float32 [B, max_length], the raw log-prob of each chosen token.
    """

    captions: list[str]
    scores: np.ndarray
    seqs: np.ndarray
    logprobs: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)


# ------------------------------------------------------------------------------------------- export dir
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest(export_dir: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` of an export dir (format version and the fields the runtime uses)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ExportDirError(f"{export_dir}: export directory not found")
    if not path.is_file():
        raise ExportDirError(f"{export_dir} is not an export directory: {path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportDirError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ExportDirError(f"{path} is not a JSON object")
    version = manifest.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise ExportDirError(
            f"{path}: unknown format_version {version!r} (this runtime reads "
            f"{', '.join(map(str, FORMAT_VERSIONS))}); re-export the checkpoint with this version's "
            "aoanet-export, or upgrade the runtime"
        )
    missing = [k for k in ("ix_to_word", "unk_id", "vocab_size", "sizes", "files") if k not in manifest]
    missing += [f"sizes.{k}" for k in ("rnn_size", "att_feat_size") if k not in manifest.get("sizes", {})]
    missing += [f"files.{k}" for k in (ENCODER, DECODER) if k not in manifest.get("files", {})]
    if missing:
        raise ExportDirError(f"{path}: field(s) missing: {', '.join(missing)}")
    return manifest


def _read_model(export_dir: Path, manifest: dict, name: str, verify: bool) -> bytes:
    """The bytes of one ONNX file, checked against the manifest's sha256 (the bytes checked are the bytes
    loaded)."""
    path = export_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportDirError(f"{path} is missing (listed in {MANIFEST})") from None
    except OSError as e:
        raise ExportDirError(f"{path} cannot be read: {e}") from None
    if verify:
        want = manifest["files"][name].get("sha256")
        got = _sha256(data)
        if got != want:
            raise ExportDirError(
                f"{path} does not match its sha256 in {MANIFEST} (expected {want}, got {got}): the file was "
                "modified or belongs to another export"
            )
    return data


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int | None = None, spinning: bool | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or default_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = DEFAULT_SPINNING if spinning is None else bool(spinning)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry(*INT8_PRECISION_OPTION)
    options.log_severity_level = 3  # errors only
    return options


def _notify_slow_int8() -> None:
    """A one-line notice (once per process) when the int8 graphs run on an x86 CPU without VNNI."""
    global _notified_int8
    if _notified_int8 or cpu_has_int8_dot() is not False:
        return
    _notified_int8 = True
    log.warning(
        "aoanet runtime: this CPU has no int8 dot-product instructions (VNNI): the int8 graphs gain little over "
        "fp32 here (measured on an AVX2 AMD Zen 2: 1.1-1.25x, vs 3.3x with VNNI) and their captions may differ"
    )


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


def in_streams(fn: Callable, items: Sequence, streams: int) -> Iterator:
    """``map(fn, items)`` with up to ``streams`` calls running at once on worker threads (1: in this thread),
    results yielded in order. On an error the calls not yet started are cancelled and the error is raised."""
    if streams <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="aoanet-stream") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _has_candidate_head(decoder) -> bool:
    """Does the decoder session take the candidate head's inputs? (optional inputs, so onnxruntime lists them as
    overridable initializers; a session-like object without these methods, e.g. a Paddle predictor, has none)"""
    if not hasattr(decoder, "get_overridable_initializers"):
        return False
    names = {i.name for i in list(decoder.get_inputs()) + list(decoder.get_overridable_initializers())}
    return set(HEAD_INPUTS) <= names


# ------------------------------------------------------------------------------------------- captioner
class Captioner:
    """An encoder and a decoder session plus the manifest (vocabulary, sizes) of one export."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, manifest: dict):
        self.encoder, self.decoder, self.manifest = encoder, decoder, manifest
        sizes = manifest["sizes"]
        self.att_feat_size = int(sizes["att_feat_size"])
        self.rnn_size = int(sizes["rnn_size"])
        self.vocab_size = int(manifest["vocab_size"])
        self.unk_id = int(manifest["unk_id"])
        self.ix_to_word = {str(k): w for k, w in manifest["ix_to_word"].items()}
        self._bad_ending_ids = bad_ending_ids(self.ix_to_word)
        # The decoder reads each image's memory once for its beams; False feeds it repeated per row (the same
        # graph accepts both; kept for the test that they agree).
        self.memory_per_image = True
        # The decoder's candidate head (exports of format 3): fetch each row's top-k words instead of the
        # [rows, V+1] log-probs when the search needs nothing else. False: always the log-probs (kept for the
        # test that both give the same results).
        self.has_candidate_head = _has_candidate_head(decoder)
        self.use_candidates = self.has_candidate_head
        # Keep each batch's memory on the decoder's device for all its steps (OrtValues) instead of
        # feeding it from host arrays at every step: on a GPU that spares a host-to-device copy of the keys and
        # values at every step (14.7 MB per step at full size, batch 50; re-sent only when finished images are
        # dropped). On by default when the decoder runs on CUDA; on the CPU it only adds the binding calls
        # (False there; the test runs it on the CPU and requires the same results).
        self.device_memory = CUDA in decoder.get_providers() if hasattr(decoder, "get_providers") else False
        self.export_dir: Path | None = None
        self.precision = "fp32"
        self.streams = 1  # batches decoded at once by caption(), each on its own thread (see from_dir)

    @classmethod
    def from_dir(
        cls,
        export_dir: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spinning: bool | None = None,
        verify: bool = True,
        precision: str = "fp32",
        streams: int = 1,
    ) -> Captioner:
        """Load an export dir, refusing a missing manifest, an unknown format version and (``verify``) a model
        file whose sha256 differs from the manifest's. ``threads``: intra-op threads per session (default:
        the CPUs this process may use); ``providers``: default CUDA if available, else CPU.

        ``precision``: "fp32" (the graphs checked against the Paddle model at export) or "int8" (the
        dynamically quantized graphs of ``aoanet-export --int8``: faster and smaller, but lossy: captions may
        differ from fp32's).

        ``streams``: how many batches ``caption`` decodes at once, each on its own Python thread sharing the two
        sessions (onnxruntime runs them concurrently); the default intra-op threads per session becomes
        CPUs // streams. Several streams keep every core busy through the parts a single stream runs on one
        core (numpy's search bookkeeping, small graph ops). Measured on 2 cores, full-size model, batch 50
        (scripts/bench_infer.py): 2 streams of 1 thread gave int8 +4-5%, fp32 +2%, for jobs of several
        batches; a single batch runs on fewer threads, so the default is 1. Results do not depend on it (each
        batch is decoded as it would be alone)."""
        if precision not in MODEL_FILES:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir)
        names = MODEL_FILES[precision]
        absent = [name for name in names if name not in manifest["files"]]
        if absent:
            raise ExportDirError(
                f"{export_dir} has no {precision} graphs ({', '.join(absent)} not in its {MANIFEST}): re-export "
                "the checkpoint with `aoanet-export --int8` to use them"
            )
        streams = int(streams)
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        providers = choose_providers(providers)
        if threads is None and streams > 1:
            threads = max(1, default_threads() // streams)
        options = session_options(threads, spinning)
        sessions = []
        for name in names:
            data = _read_model(export_dir, manifest, name, verify)
            try:
                sessions.append(ort.InferenceSession(data, sess_options=options, providers=providers))
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportDirError(f"{export_dir / name}: onnxruntime cannot load it ({e})") from None
        if CUDA in providers and CUDA not in sessions[1].get_providers():
            log.warning("aoanet runtime: CUDAExecutionProvider could not be initialised, running on the CPU")
        if precision == "int8" and CUDA not in sessions[1].get_providers():
            _notify_slow_int8()
        captioner = cls(sessions[0], sessions[1], manifest)
        captioner.export_dir = export_dir
        captioner.precision = precision
        captioner.streams = streams
        return captioner

    @property
    def providers(self) -> list[str]:
        return self.decoder.get_providers()

    # -------------------------------------------------------------------------------------- inputs
    def _check_array(self, feats: np.ndarray, what: str) -> None:
        if feats.ndim != 2:
            raise FeatureError(f"{what}: expected a (regions, {self.att_feat_size}) array, got shape {feats.shape}")
        if feats.shape[1] != self.att_feat_size:
            raise FeatureError(
                f"{what}: feature width {feats.shape[1]}, the model expects {self.att_feat_size} (att_feat_size)"
            )
        if feats.shape[0] < 1:
            raise FeatureError(f"{what}: 0 regions; every image needs at least one")

    def _check_finite(self, feats: np.ndarray, what: str) -> None:
        if not np.isfinite(feats).all():
            raise FeatureError(f"{what}: features contain NaN or infinite values")

    def _prepare(self, att_feats, att_masks, batch_size: int) -> tuple[int, list[tuple]]:
        """-> (number of images, [(positions, padded feats, masks), ...])."""
        if isinstance(att_feats, np.ndarray) and att_feats.dtype != object:
            if att_feats.ndim != 3:
                raise FeatureError(
                    f"att_feats must be [images, regions, {self.att_feat_size}] or a list of per-image "
                    f"(regions, {self.att_feat_size}) arrays, got shape {att_feats.shape}"
                )
            b, n, width = att_feats.shape
            if width != self.att_feat_size:
                raise FeatureError(
                    f"att_feats: feature width {width}, the model expects {self.att_feat_size} (att_feat_size)"
                )
            if b == 0:
                return 0, []
            if n == 0:
                raise FeatureError("att_feats has 0 regions per image; every image needs at least one")
            if att_masks is None:
                att_masks = np.ones((b, n), dtype=np.float32)
            att_masks = np.asarray(att_masks, dtype=np.float32)
            if att_masks.shape != (b, n):
                raise FeatureError(f"att_masks must have shape {(b, n)} (images, regions), got {att_masks.shape}")
            empty = np.nonzero(att_masks.sum(axis=1) == 0)[0]
            if empty.size:
                raise FeatureError(f"image {int(empty[0])} has 0 regions (its att_masks row is all zeros)")
            feats = np.asarray(att_feats, dtype=np.float32)
            self._check_finite(feats, "att_feats")
            batches = []
            for start in range(0, b, batch_size):
                pos = np.arange(start, min(start + batch_size, b))
                batches.append((pos, feats[start : start + batch_size], att_masks[start : start + batch_size]))
            return b, batches
        if att_masks is not None:
            raise FeatureError("att_masks is only for a padded [images, regions, width] array, not for a list")
        images = [np.asarray(f) for f in att_feats]
        for i, f in enumerate(images):
            self._check_array(f, f"image {i}")
            self._check_finite(f, f"image {i}")
        batches = []
        for pos in batch_plan([f.shape[0] for f in images], batch_size):
            feats, masks = pad_batch([images[i] for i in pos])
            batches.append((pos, feats, masks))
        return len(images), batches

    # -------------------------------------------------------------------------------------- graphs
    def encode(self, att_feats: np.ndarray, att_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, N, F], [B, N] -> (mean_feats [B, R], att_values, att_keys [B, heads, N, d_k])."""
        return tuple(
            self.encoder.run(
                ENCODER_OUTPUTS,
                {
                    "att_feats": np.ascontiguousarray(att_feats, np.float32),
                    "att_masks": np.ascontiguousarray(att_masks, np.float32),
                },
            )
        )

    def _run_decoder(self, it, h, c, mean_feats, memory: dict, topk: int | None) -> tuple:
        """-> (log-probs [rows, V+1], or Candidates of ``topk`` words per row, next h, next c)."""
        feeds = {"it": it, "state_h": h, "state_c": c, "mean_feats": mean_feats}
        feeds.update((name, memory[name]) for name in MEMORY)
        if topk is None:  # the head's input has a default
            return tuple(self._run(DECODER_OUTPUTS, feeds))
        feeds["topk"] = np.array([topk], np.int64)
        ids, logprobs, h, c = self._run(CANDIDATE_OUTPUTS, feeds)
        return Candidates(ids, logprobs, self.vocab_size + 1), h, c

    def _run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        """One decoder run. When the memory is OrtValues on the decoder's device (``device_memory``) the run takes
        OrtValues: those are used where they are, the host arrays are wrapped without a copy (onnxruntime sends
        them to the device as before); the outputs come back to the host (the search reads them). IOBinding
        would refuse the candidate head's ``topk`` (an overridable initializer), run_with_ort_values takes it."""
        if not any(isinstance(value, ort.OrtValue) for value in feeds.values()):
            return self.decoder.run(outputs, feeds)
        values = {
            name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value)
            )
            for name, value in feeds.items()
        }
        return [value.numpy() for value in self.decoder.run_with_ort_values(outputs, values)]

    def _to_device(self, memory: dict) -> dict:
        """The memory arrays as OrtValues on the decoder's device (CUDA device 0, or the CPU)."""
        device = "cuda" if CUDA in self.decoder.get_providers() else "cpu"
        return {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0) for name, x in memory.items()
        }

    def _step(self, it: np.ndarray, ctx: dict) -> tuple[np.ndarray, dict]:
        first = ctx.get("bos")
        if first is not None:
            # The BOS step of a beam search: the K beams of an image have the same input, state and encoder
            # rows, so one row per image is run and repeated (the search only reads beam 0's row anyway).
            k, mean_feats, memory = first
            zeros = np.zeros((2, mean_feats.shape[0], self.rnn_size), dtype=np.float32)
            logprobs, h, c = self._run_decoder(it[::k], zeros, zeros, mean_feats, memory, ctx["topk"])
            ctx = {name: v for name, v in ctx.items() if name != "bos"}
            repeat = np.repeat(np.arange(len(logprobs)), k)
            logprobs = logprobs.rows(repeat) if isinstance(logprobs, Candidates) else logprobs[repeat]
            return logprobs, {
                **ctx,
                "h": np.repeat(h, k, axis=1),
                "c": np.repeat(c, k, axis=1),
            }
        logprobs, h, c = self._run_decoder(it, ctx["h"], ctx["c"], ctx["mean_feats"], ctx, ctx["topk"])
        return logprobs, {**ctx, "h": h, "c": c}

    @staticmethod
    def _reorder(ctx: dict, index: np.ndarray) -> dict:
        # Only the state moves: beams are reordered inside their image's block, whose memory is shared.
        return {**ctx, "h": ctx["h"][:, index], "c": ctx["c"][:, index]}

    def _keep(self, ctx: dict, index: np.ndarray) -> dict:
        # The search keeps whole images (k consecutive rows each); the memory keeps those images' rows.
        k = ctx["rows_per_memory"]
        images = index[::k] // k
        host = ctx.get("host_memory")
        memory = {name: (ctx if host is None else host)[name][images] for name in MEMORY}
        kept = {
            "h": ctx["h"][:, index],
            "c": ctx["c"][:, index],
            "mean_feats": ctx["mean_feats"][index],
            **memory,
            "rows_per_memory": k,
            "topk": ctx["topk"],
        }
        if host is not None:  # device_memory: the kept rows are sent to the device once, for the next steps
            kept.update(self._to_device(memory), host_memory=memory)
        return kept

    def decode(
        self,
        att_feats: np.ndarray,
        att_masks: np.ndarray | None = None,
        beam_size: int = 3,
        max_length: int = 20,
        greedy_unk: bool = True,
        **options,
    ) -> DecodeResult:
        """One batch, padded: the onnxruntime twin of ``AoAModel.decode`` (same arguments, same result).

        options: length_penalty, block_trigrams, bad_ending_ids, early_stop, suppress_unk.
        """
        att_feats = np.ascontiguousarray(att_feats, dtype=np.float32)
        batch = att_feats.shape[0]
        if att_masks is None:
            att_masks = np.ones(att_feats.shape[:2], dtype=np.float32)
        att_masks = np.ascontiguousarray(att_masks, dtype=np.float32)
        mean_feats, values, keys = self.encode(att_feats, att_masks)
        memory = {"att_values": values, "att_keys": keys, "att_masks": att_masks}
        greedy = is_greedy(beam_size, greedy_unk)
        k = 1 if greedy else int(beam_size)
        topk = None
        bad_endings = options.get("bad_ending_ids")
        if self.use_candidates and not options.get("block_trigrams") and (bad_endings is None or not len(bad_endings)):
            # The search reads only each row's best words (k + 1 with the UNK penalty; greedy: 1, no penalty).
            unk = None if greedy or not options.get("suppress_unk", True) else self.unk_id
            topk = Candidates.needed(k, unk, self.vocab_size + 1)
        ctx = {"mean_feats": mean_feats, **memory, "rows_per_memory": 1, "topk": topk}
        if k > 1:
            ctx["mean_feats"] = np.repeat(mean_feats, k, axis=0)
            if self.memory_per_image:
                ctx["rows_per_memory"] = k
            else:
                ctx.update({name: np.repeat(x, k, axis=0) for name, x in memory.items()})
            ctx["bos"] = (k, mean_feats, memory)
        if self.device_memory:
            host = {name: ctx[name] for name in MEMORY}
            ctx.update(self._to_device(host), host_memory=host)
            if k > 1:
                per_image = ctx if self.memory_per_image else self._to_device(memory)
                ctx["bos"] = (k, mean_feats, {name: per_image[name] for name in MEMORY})
        ctx["h"] = ctx["c"] = np.zeros((2, batch * k, self.rnn_size), dtype=np.float32)
        return search(
            self._step,
            self._reorder,
            self._keep,
            ctx,
            batch,
            beam_size,
            max_length=max_length,
            greedy_unk=greedy_unk,
            unk_idx=self.unk_id,
            **options,
        )

    def caption(
        self,
        att_feats: np.ndarray | Sequence[np.ndarray],
        att_masks: np.ndarray | None = None,
        beam_size: int = 3,
        max_length: int = 20,
        batch_size: int = 50,
        *,
        length_penalty: str = "",
        block_trigrams: bool = False,
        remove_bad_endings: bool = False,
        greedy_unk: bool = True,
        suppress_unk: bool = True,
        early_stop: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> Captions:
        """Caption many images: ``att_feats`` is a padded float32 [B, N, F] array (with ``att_masks``
        [B, N], 1 = region, default all ones) or a list of per-image (K_i, F) arrays, which are grouped by
        region count into batches of ``batch_size`` and padded. Results are in input order.

        Defaults are the authors' semantics (summed log-probs, UNK suppressed, no length penalty);
        ``beam_size=1`` decodes greedily (``greedy_unk``, like AoAModel.decode). ``remove_bad_endings``: no
        EOS right after a bad-ending word, and such words stripped from the caption's end (as the reference).
        ``on_batch(n_images)`` is called after each batch, in order (progress bars). With ``streams`` > 1 (see
        ``from_dir``) that many batches are decoded at once on worker threads.
        """
        if int(beam_size) < 1 or int(max_length) < 1 or int(batch_size) < 1:
            raise ValueError("beam_size, max_length and batch_size must be >= 1")
        n_images, batches = self._prepare(att_feats, att_masks, int(batch_size))
        seqs = np.zeros((n_images, max_length), dtype=np.int64)
        scores = np.zeros(n_images, dtype=np.float64)
        logprobs = np.zeros((n_images, max_length), dtype=np.float32)
        # (greedy decoding takes only the options it has: runtime.beam.search)
        options = dict(
            block_trigrams=block_trigrams,
            length_penalty=length_penalty,
            early_stop=early_stop,
            suppress_unk=suppress_unk,
        )
        if remove_bad_endings:
            options["bad_ending_ids"] = self._bad_ending_ids

        def decode(batch):
            _, feats, masks = batch
            return self.decode(feats, masks, beam_size, max_length, greedy_unk=greedy_unk, **options)

        for (pos, _, _), result in zip(batches, in_streams(decode, batches, self.streams), strict=True):
            seqs[pos], scores[pos], logprobs[pos] = result.seqs, result.scores, result.logprobs
            if on_batch is not None:
                on_batch(len(pos))
        captions = decode_sequence(self.ix_to_word, seqs, remove_bad_endings=remove_bad_endings)
        return Captions(captions, scores, seqs, logprobs)
