"""Captioning with the exported graphs and onnxruntime: ``Captioner.from_dir(EXPORT_DIR).caption(feats)``.

The encoder runs once per batch of images; the decoder runs once per step over every live beam of the whole
batch, driven by the shared numpy search (``aoanet_runtime.beam``) exactly as ``AoAModel.decode`` drives the Paddle
model: rows image-major (row ``b * K + k`` is beam ``k`` of image ``b``), mean_feats repeated K times, the
memory (keys and values in head layout, mask) once per image for its K beams, zero state, BOS (0) first;
``beam_size == 1`` with ``greedy_unk`` is greedy decoding. Same inputs and weights, same captions, whichever
backend.

Imports numpy and onnxruntime only (never paddle, never the training package).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from aoanet_runtime.beam import Candidates, DecodeResult, NonFiniteError, is_greedy, search
from aoanet_runtime.contract import (
    ATTENTION_OUTPUT,
    CANDIDATE_OUTPUTS,
    DECODER_OUTPUTS,
    ENCODER_MEMORY_OUTPUTS,
    EXTRACTOR,
    EXTRACTOR_SPEC,
    HEAD_INPUTS,
    MANIFEST,
    MEMORY,
    MODEL_FILES,
    PRECISIONS,
)
from aoanet_runtime.exportdir import ExportDirError, load_manifest, read_model
from aoanet_runtime.features import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_REGIONS,
    FeatureError,
    MemoryModel,
    batch_plan,
    check_regions,
    pad_batch,
)
from aoanet_runtime.sessions import (
    CUDA,
    choose_providers,
    default_threads,
    has_input,
    has_output,
    notify_slow_int8,
    session_options,
)
from aoanet_runtime.vocab import bad_ending_ids, caption_tokens, decode_sequence

__all__ = ["Captioner", "Captions", "ExportDirError", "FeatureError", "NonFiniteError", "load_manifest"]

log = logging.getLogger(__name__)


@dataclass
class Captions:
    """One entry per image, in input order.

    captions: the words up to the first EOS (``aoanet_runtime.vocab.decode_sequence``).
    scores: float64 [B], the search's score (see ``aoanet_runtime.beam.DecodeResult``).
    seqs: int64 [B, max_length]; logprobs: float32 [B, max_length], the raw log-prob of each chosen token.

    With ``return_attention=True`` (docs/attention.md):
    tokens: each caption's tokens (vocabulary words; as the caption, bad endings removed when asked);
    attention: per image float32 [len(tokens), heads, regions], the decoder's attention weights over the image's
        regions when it chose each token (a list input: the image's own regions; a padded array: all N, 0 on
        padding); the mean over heads is what ``aoanet_runtime.attention.draw_attention`` draws.
    and from ``caption_images`` also boxes (per image float32 [cells, 4], the extractor's cells in the picture's
    pixels, x1 y1 x2 y2), grids ((rows, columns) per image) and sizes ((width, height) of each picture: a file's own
    size, even when a JPEG was decoded at a reduced scale).
    """

    captions: list[str]
    scores: np.ndarray
    seqs: np.ndarray
    logprobs: np.ndarray
    tokens: list[list[str]] | None = None
    attention: list[np.ndarray] | None = None
    boxes: list[np.ndarray] | None = None
    grids: list[tuple[int, int]] | None = None
    sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.captions)


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


# ------------------------------------------------------------------------------------------- captioner
class Captioner:
    """An encoder and a decoder session plus the manifest (vocabulary, sizes) of one export."""

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        manifest: dict,
        device_memory: bool | None = None,
    ):
        """``device_memory``: keep each batch's memory (keys, values, mask) on the decoder's device as OrtValues for
        all its steps instead of feeding it from host arrays at every step; sent again only when finished images
        are dropped. On a GPU this spares a host-to-device copy of the memory at every step. Default: on when the
        decoder runs on CUDA (on the CPU it gives the same results and only adds the wrapping)."""
        self.encoder, self.decoder, self.manifest = encoder, decoder, manifest
        sizes = manifest["sizes"]
        self.att_feat_size = int(sizes["att_feat_size"])
        self.rnn_size = int(sizes["rnn_size"])
        self.vocab_size = int(manifest["vocab_size"])
        # what batch planning bounds (aoanet_runtime.features.MemoryModel)
        self.memory_model = MemoryModel(self.att_feat_size, self.rnn_size, int(sizes.get("num_heads", 8)))
        self.unk_id = int(manifest["unk_id"])
        self.ix_to_word = {str(k): w for k, w in manifest["ix_to_word"].items()}
        self._bad_ending_ids = bad_ending_ids(self.ix_to_word)
        # The decoder's candidate head (exports of format >= 3): the search fetches each row's best words instead
        # of the [rows, V+1] log-probs when no constraint needs the other values.
        self.has_candidate_head = all(has_input(decoder, name) for name in HEAD_INPUTS)
        # The decoder's attention weights (exports of format >= 6), fetched only when a caller asks for them.
        self.has_attention = has_output(decoder, ATTENTION_OUTPUT)
        if device_memory is None:
            device_memory = CUDA in decoder.get_providers() if hasattr(decoder, "get_providers") else False
        self.device_memory = bool(device_memory)
        self.export_dir: Path | None = None
        self.precision = "fp32"
        self.streams = 1  # batches decoded at once by caption(), each on its own thread (see from_dir)
        self._extractor = None
        self._threads: int | None = None
        self._verify = True

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
        device_memory: bool | None = None,
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
        core (numpy's search bookkeeping, small graph ops); it helps jobs of several batches a little and slows a
        single batch (docs/benchmarks.md, "Streams"), so the default is 1. Results do not depend on it (each batch
        is decoded as it would be alone).

        ``device_memory``: see ``Captioner``."""
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
            data = read_model(export_dir, manifest, name, verify)
            try:
                sessions.append(ort.InferenceSession(data, sess_options=options, providers=providers))
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportDirError(f"{export_dir / name}: onnxruntime cannot load it ({e})") from None
        if CUDA in providers and CUDA not in sessions[1].get_providers():
            log.warning("aoanet runtime: CUDAExecutionProvider could not be initialised, running on the CPU")
        if precision == "int8" and CUDA not in sessions[1].get_providers():
            notify_slow_int8()
        captioner = cls(sessions[0], sessions[1], manifest, device_memory=device_memory)
        captioner.export_dir = export_dir
        captioner.precision = precision
        captioner.streams = streams
        captioner._threads, captioner._verify = threads, verify
        return captioner

    @property
    def providers(self) -> list[str]:
        return self.decoder.get_providers()

    def no_attention_message(self) -> str:
        version = self.manifest.get("format_version")
        return (
            f"{self.export_dir or 'this model'} was exported without the decoder's attention weights (export format "
            f"{version}; they are an output from format 6 on): re-export the checkpoint with this version's "
            "aoanet-export to get them"
        )

    # -------------------------------------------------------------------------------------- images
    @property
    def has_extractor(self) -> bool:
        """Was the model exported with an image extractor (so that it captions pictures)?"""
        return EXTRACTOR in self.manifest.get("files", {})

    def no_extractor_message(self) -> str:
        return (
            f"{self.export_dir or 'this model'} was exported without an image extractor: it captions region "
            f"features of width {self.att_feat_size} (att_feat_size), e.g. bottom-up features (aoanet-data bu) "
            "given with --features; to caption pictures, train on features of an image extractor "
            "(aoanet-data extract) and export that checkpoint (docs/images.md)"
        )

    @property
    def extractor(self):
        """The export's image extractor (``aoanet_runtime.extractor.Extractor``), loaded on first use."""
        if self._extractor is None:
            from aoanet_runtime.extractor import Extractor, ExtractorError

            if not self.has_extractor or self.export_dir is None:
                raise ExportDirError(self.no_extractor_message())
            graph = read_model(self.export_dir, self.manifest, EXTRACTOR, self._verify)
            spec = read_model(self.export_dir, self.manifest, EXTRACTOR_SPEC, self._verify)
            try:
                extractor = Extractor.from_bytes(
                    graph, spec, str(self.export_dir / EXTRACTOR), providers=self.providers, threads=self._threads
                )
            except ExtractorError as e:
                raise ExportDirError(str(e)) from None
            if extractor.spec.feature_width != self.att_feat_size:
                raise ExportDirError(
                    f"{self.export_dir / EXTRACTOR_SPEC}: the extractor gives {extractor.spec.feature_width}-d "
                    f"features, the model reads {self.att_feat_size}-d"
                )
            self._extractor = extractor
        return self._extractor

    def caption_images(
        self,
        images: Sequence,
        beam_size: int = 3,
        max_length: int = 20,
        batch_size: int = 50,
        extract_batch_size: int = 16,
        return_attention: bool = False,
        **options,
    ) -> Captions:
        """Caption pictures: paths, ``PIL.Image``s or uint8 arrays (H, W) / (H, W, 3|4). Each is decoded and
        pre-processed as the export's extractor spec says, run through ``extractor.onnx``, and its grid captioned
        as ``caption`` does (``options`` are caption's). Raises ExportDirError when the model has no extractor,
        ``aoanet_runtime.images.ImageError`` naming the first bad picture.

        ``return_attention``: also each token's attention over the grid's cells, with the cells' boxes in the
        picture's pixels (a file's full size, even when a JPEG was decoded at a reduced scale), the pictures' sizes
        and the grids' shapes (``Captions``): what ``aoanet_runtime.attention.draw_attention`` takes."""
        if return_attention and not self.has_attention:
            raise ExportDirError(self.no_attention_message())
        feats = self.extractor.features(images, batch_size=extract_batch_size)
        result = self.caption([f.att for f in feats], beam_size=beam_size, max_length=max_length,
                              batch_size=batch_size, return_attention=return_attention, **options)
        if return_attention:
            from aoanet_runtime.images import probe

            result.boxes, result.sizes = [], []
            for image, f in zip(images, feats, strict=True):
                # a JPEG file may have been decoded at a reduced scale: the boxes in the file's own pixels
                size = probe(image) if isinstance(image, (str, os.PathLike)) else f.size
                scale = np.array([size[0] / f.size[0], size[1] / f.size[1]] * 2, np.float32)
                result.boxes.append(f.boxes * scale)
                result.sizes.append(tuple(size))
            result.grids = [f.grid for f in feats]
        return result

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

    def _prepare(self, att_feats, att_masks, batch_size: int, max_regions: int | None,
                 max_batch_bytes: int) -> tuple[int, list[tuple]]:
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
            counts = att_masks.sum(axis=1)
            empty = np.nonzero(counts == 0)[0]
            if empty.size:
                raise FeatureError(f"image {int(empty[0])} has 0 regions (its att_masks row is all zeros)")
            check_regions(n, "att_feats", max_regions)
            feats = np.asarray(att_feats, dtype=np.float32)
            self._check_finite(feats, "att_feats")
            # every image is padded to n regions: the batch size that fits the memory bound at n
            memory = self.memory_model
            if memory.batch_bytes(1, n) > max_batch_bytes:
                raise FeatureError(f"att_feats: {n} regions per image need ~{memory.batch_bytes(1, n) / 2**20:.0f} "
                                   f"MB each, over the batch limit of {max_batch_bytes / 2**20:.0f} MB")
            step = max(1, min(batch_size, (max_batch_bytes - memory.BATCH_BYTES) // memory.image_bytes(n)))
            batches = []
            for start in range(0, b, step):
                pos = np.arange(start, min(start + step, b))
                batches.append((pos, feats[start : start + step], att_masks[start : start + step]))
            return b, batches
        if att_masks is not None:
            raise FeatureError("att_masks is only for a padded [images, regions, width] array, not for a list")
        images = [np.asarray(f) for f in att_feats]
        for i, f in enumerate(images):
            self._check_array(f, f"image {i}")
            check_regions(f.shape[0], f"image {i}", max_regions)
            self._check_finite(f, f"image {i}")
        batches = []
        for pos in batch_plan([f.shape[0] for f in images], batch_size, self.memory_model, max_batch_bytes):
            feats, masks = pad_batch([images[i] for i in pos])
            batches.append((pos, feats, masks))
        return len(images), batches

    # -------------------------------------------------------------------------------------- graphs
    def encode(self, att_feats: np.ndarray, att_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, N, F], [B, N] -> (mean_feats [B, R], att_values, att_keys [B, heads, N, d_k])."""
        return tuple(
            self.encoder.run(
                list(ENCODER_MEMORY_OUTPUTS),
                {
                    "att_feats": np.ascontiguousarray(att_feats, np.float32),
                    "att_masks": np.ascontiguousarray(att_masks, np.float32),
                },
            )
        )

    def _run_decoder(self, it, h, c, mean_feats, memory: dict, topk: int | None, attention: bool = False) -> tuple:
        """-> (log-probs [rows, V+1], or Candidates of ``topk`` words per row, next h, next c, and the attention
        weights [rows, heads, N] when ``attention``, else None)."""
        feeds = {"it": it, "state_h": h, "state_c": c, "mean_feats": mean_feats}
        feeds.update((name, memory[name]) for name in MEMORY)
        if self.has_candidate_head:  # a required input from format 4 on; its value does not change the log-probs
            feeds["topk"] = np.array([topk or 1], np.int64)
        # the attention output is copied out of onnxruntime only when it is fetched
        extra = [ATTENTION_OUTPUT] if attention else []
        if topk is None:
            logprobs, h, c, *att = self._run([*DECODER_OUTPUTS, *extra], feeds)
        else:
            ids, cand_lp, h, c, *att = self._run([*CANDIDATE_OUTPUTS, *extra], feeds)
            logprobs = Candidates(ids, cand_lp, self.vocab_size + 1)
        return logprobs, h, c, (att[0] if attention else None)

    def _run(self, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        """One decoder run. When the memory is OrtValues on the decoder's device (``device_memory``) the run takes
        OrtValues: those are used where they are, the host arrays are wrapped without a copy (onnxruntime sends
        them to the device as before); the outputs come back to the host (the search reads them). IOBinding
        would refuse format 3's ``topk`` (an overridable initializer); run_with_ort_values takes it."""
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

    def _step(self, it: np.ndarray, ctx: dict) -> tuple:
        """(logprobs, ctx), or (logprobs, ctx, attention) when ``ctx["attention"]`` (the search's step contract)."""
        first = ctx.get("bos")
        want = ctx.get("attention", False)
        if first is not None:
            # The BOS step of a beam search: the K beams of an image have the same input, state and encoder
            # rows, so one row per image is run and repeated (the search only reads beam 0's row anyway).
            k, mean_feats, memory = first
            zeros = np.zeros((2, mean_feats.shape[0], self.rnn_size), dtype=np.float32)
            logprobs, h, c, att = self._run_decoder(it[::k], zeros, zeros, mean_feats, memory, ctx["topk"], want)
            ctx = {name: v for name, v in ctx.items() if name != "bos"}
            repeat = np.repeat(np.arange(len(logprobs)), k)
            logprobs = logprobs.rows(repeat) if isinstance(logprobs, Candidates) else logprobs[repeat]
            ctx = {**ctx, "h": np.repeat(h, k, axis=1), "c": np.repeat(c, k, axis=1)}
            return (logprobs, ctx, att[repeat]) if want else (logprobs, ctx)
        logprobs, h, c, att = self._run_decoder(it, ctx["h"], ctx["c"], ctx["mean_feats"], ctx, ctx["topk"], want)
        ctx = {**ctx, "h": h, "c": c}
        return (logprobs, ctx, att) if want else (logprobs, ctx)

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
            "attention": ctx.get("attention", False),
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
        return_attention: bool = False,
        **options,
    ) -> DecodeResult:
        """One batch, padded: the onnxruntime twin of ``AoAModel.decode`` (same arguments, same result).

        options: length_penalty, block_trigrams, bad_ending_ids, early_stop, suppress_unk. ``return_attention``:
        the result's ``attention`` [B, max_length, heads, N] holds each chosen token's attention weights (an export
        of format 6 or later; ExportDirError otherwise).
        """
        if return_attention and not self.has_attention:
            raise ExportDirError(self.no_attention_message())
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
        constrained = options.get("block_trigrams") or (bad_endings is not None and len(bad_endings))
        if self.has_candidate_head and not constrained:
            # The search reads only each row's best words (k + 1 with the UNK penalty; greedy: 1, no penalty).
            unk = None if greedy or not options.get("suppress_unk", True) else self.unk_id
            topk = Candidates.needed(k, unk, self.vocab_size + 1)
        ctx = {"mean_feats": mean_feats, **memory, "rows_per_memory": 1, "topk": topk, "attention": return_attention}
        if k > 1:
            ctx["mean_feats"] = np.repeat(mean_feats, k, axis=0)
            ctx["rows_per_memory"] = k
            ctx["bos"] = (k, mean_feats, memory)
        if self.device_memory:
            host = {name: ctx[name] for name in MEMORY}
            ctx.update(self._to_device(host), host_memory=host)
            if k > 1:
                ctx["bos"] = (k, mean_feats, {name: ctx[name] for name in MEMORY})
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
            return_attention=return_attention,
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
        max_regions: int | None = DEFAULT_MAX_REGIONS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        return_attention: bool = False,
    ) -> Captions:
        """Caption many images: ``att_feats`` is a padded float32 [B, N, F] array (with ``att_masks``
        [B, N], 1 = region, default all ones) or a list of per-image (K_i, F) arrays, which are grouped by
        region count into batches of ``batch_size`` and padded. Results are in input order.

        Defaults are the authors' semantics (summed log-probs, UNK suppressed, no length penalty);
        ``beam_size=1`` decodes greedily (``greedy_unk``, like AoAModel.decode). ``remove_bad_endings``: no
        EOS right after a bad-ending word, and such words stripped from the caption's end (as the reference).
        ``on_batch(n_images)`` is called after each batch, in order (progress bars). With ``streams`` > 1 (see
        ``from_dir``) that many batches are decoded at once on worker threads.

        Bounds: an image with more than ``max_regions`` regions is refused (None: no limit), and batches hold no
        more images than fit in ``max_batch_bytes`` of estimated working memory (``aoanet_runtime.features``). An
        image whose features make the decoder's outputs NaN or infinite is a ``NonFiniteError`` naming it.

        ``return_attention``: also each caption's tokens and, per token, the decoder's attention weights over the
        image's regions, per head (``Captions.tokens``, ``Captions.attention``; docs/attention.md). Captions, scores
        and speed are those of a call without it (the weights are fetched from the decoder only when asked for).
        """
        if int(beam_size) < 1 or int(max_length) < 1 or int(batch_size) < 1:
            raise ValueError("beam_size, max_length and batch_size must be >= 1")
        if return_attention and not self.has_attention:
            raise ExportDirError(self.no_attention_message())
        padded = isinstance(att_feats, np.ndarray) and att_feats.dtype != object
        n_images, batches = self._prepare(att_feats, att_masks, int(batch_size), max_regions, int(max_batch_bytes))
        seqs = np.zeros((n_images, max_length), dtype=np.int64)
        scores = np.zeros(n_images, dtype=np.float64)
        logprobs = np.zeros((n_images, max_length), dtype=np.float32)
        # (greedy decoding takes only the options it has: aoanet_runtime.beam.search)
        options = dict(
            block_trigrams=block_trigrams,
            length_penalty=length_penalty,
            early_stop=early_stop,
            suppress_unk=suppress_unk,
        )
        if remove_bad_endings:
            options["bad_ending_ids"] = self._bad_ending_ids

        def decode(batch):
            pos, feats, masks = batch
            try:
                return self.decode(feats, masks, beam_size, max_length, greedy_unk=greedy_unk,
                                   return_attention=return_attention, **options)
            except NonFiniteError as e:
                images = [int(pos[i]) for i in e.images]
                biggest = float(np.abs(feats[e.images]).max())
                raise NonFiniteError(images, f"image(s) {images}: the decoder's outputs are not finite (NaN or inf); "
                                     f"their features (largest |value| {biggest:.3g}) are out of the range this "
                                     "model handles") from None

        tokens: list = [None] * n_images
        attention: list = [None] * n_images
        for (pos, _, masks), result in zip(batches, in_streams(decode, batches, self.streams), strict=True):
            seqs[pos], scores[pos], logprobs[pos] = result.seqs, result.scores, result.logprobs
            if return_attention:
                for j, i in enumerate(pos):
                    tokens[i] = caption_tokens(self.ix_to_word, result.seqs[j], remove_bad_endings)
                    regions = masks.shape[1] if padded else int(masks[j].sum())
                    attention[i] = np.ascontiguousarray(result.attention[j, : len(tokens[i]), :, :regions])
            if on_batch is not None:
                on_batch(len(pos))
        captions = decode_sequence(self.ix_to_word, seqs, remove_bad_endings=remove_bad_endings)
        if not return_attention:
            return Captions(captions, scores, seqs, logprobs)
        return Captions(captions, scores, seqs, logprobs, tokens=tokens, attention=attention)
