"""``aoanet-infer``: caption a split (or a folder of feature files, or pictures) into a COCO results JSON.

    aoanet-infer --backend onnx --model EXPORT_DIR --features DATA_DIR [--split test] --out captions.json
    aoanet-infer --backend onnx --model EXPORT_DIR --images DIR|LIST.txt|FILE... --out captions.json
    aoanet-infer --backend onnx --precision int8 --model EXPORT_DIR ...   (an export made with --int8)
    aoanet-infer --backend paddle --checkpoint CKPT_DIR --features DATA_DIR [--split test] --out captions.json
    aoanet-infer ... --attention DIR     (also, per image, DIR/<id>.png: where the model looked at each word, and
                                          DIR/<id>.json: the weights; docs/attention.md)

Every backend lists the images the same way, checks every feature file's header before decoding, decodes the
same batches (grouped by region count, bounded in memory) through the same search, and writes the same JSON: one
``{"image_id", "caption"}`` per image in the listing's order, written atomically (on any error, nothing is
written; whether ``--out`` can be written is checked first). Backends other than onnx come from installed packages
(``aoanet_runtime.backends``). An image with more than ``--max-regions`` regions is refused from its file's header;
one whose features make the decoder's outputs NaN or infinite is an error naming it.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from aoanet_runtime import atomic
from aoanet_runtime.attention import AttentionWriter
from aoanet_runtime.backends import BackendError, load_backend
from aoanet_runtime.beam import NonFiniteError, length_penalty_fn
from aoanet_runtime.captioner import in_streams
from aoanet_runtime.cliutil import (
    EPILOG,
    check_output_dir,
    check_output_file,
    check_output_folder,
    command_args,
    report_errors,
)
from aoanet_runtime.exportdir import ExportDirError
from aoanet_runtime.extractor import ExtractorError
from aoanet_runtime.features import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_REGIONS,
    INPUT_JSON,
    BatchMemoryError,
    FeatureError,
    ImageFile,
    batch_plan,
    box_path,
    check_boxes,
    list_images,
    pad_batch,
    read_boxes,
    read_features,
    region_count,
)
from aoanet_runtime.images import ImageError, ImageRef, list_image_files, probe
from aoanet_runtime.vocab import bad_ending_ids, caption_tokens, decode_sequence

app = typer.Typer(add_completion=False, help="Caption images from their region features (AoANet).")


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


class InferError(RuntimeError):
    pass


def write_json_atomic(path: Path, obj) -> None:
    atomic.write_json(path, obj, ensure_ascii=False)


def notice(message: str) -> None:
    typer.echo(f"aoanet-infer: notice: {message}", err=True)


def _write_attention(writer: AttentionWriter, backend, result, j: int, image_id, regions: int,
                     remove_bad_endings: bool, **drawing) -> None:
    """Row ``j`` of a batch's DecodeResult: its tokens' attention over the image's ``regions``, drawn and written."""
    tokens = caption_tokens(backend.ix_to_word, result.seqs[j], remove_bad_endings)
    weights = result.attention[j, : len(tokens), :, :regions]
    writer.write(image_id, " ".join(tokens).replace("@@ ", ""), tokens, weights, **drawing)


def caption_images(
    backend,
    images: list[ImageFile],
    beam_size: int,
    max_length: int,
    batch_size: int,
    options: dict,
    remove_bad_endings: bool = False,
    progress: bool = True,
    max_regions: int | None = DEFAULT_MAX_REGIONS,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    attention: AttentionWriter | None = None,
) -> list[dict]:
    """COCO results for ``images`` (listing order). One stream: feature files are read one batch ahead on a
    thread; ``backend.streams`` > 1: that many batches are read and decoded at once
    (``aoanet_runtime.captioner.in_streams``). Batches are bounded by the backend's ``memory_model`` when it has
    one. ``attention``: each image's attention is drawn and written as its batch is done, over its boxes
    (``cocobu_box`` beside the features) or, for images without a box file, as a bar chart (with a notice)."""
    # fail fast, before any decoding: every file's header (shape, width, region limit)
    counts = [region_count(img, backend.width, max_regions) for img in images]
    boxed = [check_boxes(img, n) is not None for img, n in zip(images, counts)] if attention else []
    if attention is not None and not all(boxed):
        missing = [img for img, b in zip(images, boxed) if not b]
        notice(
            f"{len(missing)} of {len(images)} image(s) have no region boxes (looked for {box_path(missing[0])}"
            f"{' and the like' if len(missing) > 1 else ''}): their attention is drawn as a bar chart over the "
            "regions, by index, instead of on boxes"
        )
    if attention is not None:
        options = {**options, "return_attention": True}
    try:
        plan = batch_plan(counts, batch_size, getattr(backend, "memory_model", None), max_batch_bytes)
    except BatchMemoryError as e:
        img = images[e.position]
        raise FeatureError(f"{img.path} (image id {img.image_id}): {str(e).split(': ', 1)[1]}") from None
    seqs = np.zeros((len(images), max_length), dtype=np.int64)

    def load(pos):
        return pad_batch([read_features(images[i], backend.width) for i in pos])

    def decode(pos, att_feats, att_masks):
        try:
            return backend.decode(att_feats, att_masks, beam_size, max_length, **options)
        except NonFiniteError as e:
            img = images[pos[e.images[0]]]
            biggest = float(np.abs(att_feats[e.images[0]]).max())
            others = f" (and {len(e.images) - 1} more image(s) of its batch)" if len(e.images) > 1 else ""
            raise FeatureError(
                f"{img.path} (image id {img.image_id}){others}: the model's outputs are not finite (NaN or inf) for "
                f"these features (largest |value| {biggest:.3g}): they are out of the range this model handles"
            ) from None

    def load_and_decode(pos):
        return decode(pos, *load(pos))

    def prefetched():
        # one stream: decode here while the next batch's files are read on a thread
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, plan[0])
            for i in range(len(plan)):
                att_feats, att_masks = pending.result()
                if i + 1 < len(plan):
                    pending = pool.submit(load, plan[i + 1])
                yield decode(plan[i], att_feats, att_masks)

    results = in_streams(load_and_decode, plan, backend.streams) if backend.streams > 1 else prefetched()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="img", desc="captioning", file=sys.stderr)
    try:
        for pos, result in zip(plan, results, strict=True):
            seqs[pos] = result.seqs
            if attention is not None:
                for j, i in enumerate(pos):
                    boxes = read_boxes(images[i], counts[i]) if boxed[i] else None
                    _write_attention(attention, backend, result, j, images[i].image_id, counts[i],
                                     remove_bad_endings, boxes=boxes)
            if bar is not None:
                bar.update(len(pos))
    finally:
        results.close()
        if bar is not None:
            bar.close()
    captions = decode_sequence(backend.ix_to_word, seqs, remove_bad_endings=remove_bad_endings)
    return [{"image_id": img.image_id, "caption": cap} for img, cap in zip(images, captions, strict=True)]


def caption_pictures(
    backend,
    extractor,
    images: list[ImageRef],
    beam_size: int,
    max_length: int,
    batch_size: int,
    options: dict,
    remove_bad_endings: bool = False,
    progress: bool = True,
    timings: dict | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    attention: AttentionWriter | None = None,
) -> list[dict]:
    """COCO results (plus ``file_name``) for picture files. Every file's header is checked first (one error lists
    every bad file); pictures are grouped by input size (the grid's cell count) into batches; a batch's pictures
    are decoded and pre-processed on a thread while the previous batch is extracted and decoded. ``timings``
    (when given) receives the seconds spent in each stage: load (decode + pre-process, on the thread), extract,
    caption. ``attention``: each picture's attention over its grid is drawn and written as its batch is done."""
    spec = extractor.spec
    bad, cells, sizes = [], [], []
    for ref in images:
        try:
            w, h = probe(ref.path, extractor.max_pixels, spec.min_side)
        except ImageError as e:
            bad.append(str(e))
            continue
        rows, cols = spec.grid(*spec.input_size(w, h))
        cells.append(rows * cols)
        sizes.append((w, h))
    if bad:
        raise ImageError(f"{len(bad)} of {len(images)} picture(s) cannot be used:\n  " + "\n  ".join(bad))
    try:
        plan = batch_plan(cells, batch_size, getattr(backend, "memory_model", None), max_batch_bytes)
    except BatchMemoryError as e:
        raise ImageError(f"{images[e.position].path}: {str(e).split(': ', 1)[1]}") from None
    seqs = np.zeros((len(images), max_length), dtype=np.int64)
    spent = {"load": 0.0, "extract": 0.0, "caption": 0.0}
    if attention is not None:
        options = {**options, "return_attention": True}

    def load(pos):
        t = time.perf_counter()
        loaded = [extractor.load(images[i].path) for i in pos]
        spent["load"] += time.perf_counter() - t
        return loaded

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="img", desc="captioning", file=sys.stderr)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, plan[0])
            for i, pos in enumerate(plan):
                loaded = pending.result()
                if i + 1 < len(plan):
                    pending = pool.submit(load, plan[i + 1])
                t = time.perf_counter()
                feats = extractor.features_of(loaded)
                t2 = time.perf_counter()
                att_feats, att_masks = pad_batch([f.att for f in feats])
                result = backend.decode(att_feats, att_masks, beam_size, max_length, **options)
                seqs[pos] = result.seqs
                t3 = time.perf_counter()
                spent["extract"] += t2 - t
                spent["caption"] += t3 - t2
                if attention is not None:
                    for j, (i, f) in enumerate(zip(pos, feats)):
                        # the cells in the pixels of the file (the extractor may have decoded a JPEG smaller)
                        (w, h), (dw, dh) = sizes[i], f.size
                        boxes = f.boxes.astype(np.float64) * np.array([w / dw, h / dh, w / dw, h / dh])
                        _write_attention(attention, backend, result, j, images[i].image_id, len(f.att),
                                         remove_bad_endings, picture=images[i].path, boxes=boxes, grid=f.grid,
                                         size=(w, h), file_name=str(images[i].path))
                if bar is not None:
                    bar.update(len(pos))
    finally:
        if bar is not None:
            bar.close()
    if timings is not None:
        timings.update(spent)
    captions = decode_sequence(backend.ix_to_word, seqs, remove_bad_endings=remove_bad_endings)
    return [
        {"image_id": img.image_id, "caption": cap, "file_name": str(img.path)}
        for img, cap in zip(images, captions, strict=True)
    ]


def _num_images(value: int) -> int:
    if value < -1:
        raise typer.BadParameter(f"{value}: give a number of images >= 0, or -1 for all")
    return value


@app.command(epilog=EPILOG)
def infer(
    out: Path = typer.Option(..., "--out", help="COCO results JSON to write: [{image_id, caption}]"),
    features: Optional[Path] = typer.Option(
        None, "--features", help="data dir (cocotalk.json + cocobu_att/) or a folder of <id>.npz / <id>.npy"
    ),
    images: Optional[list[Path]] = typer.Option(
        None,
        "--images",
        help="pictures instead of features: a directory, a .txt list or files (needs a model with an extractor)",
    ),
    coco_ids: bool = typer.Option(
        False, "--coco-ids", help="--images: ids are the number ending the file name (COCO_val2014_000000391895)"
    ),
    extractor: Optional[Path] = typer.Option(
        None, "--extractor", help="--images with --backend paddle: the extractor dir (default: the checkpoint's)"
    ),
    backend: str = typer.Option(
        "onnx", "--backend", help="onnx (onnxruntime), or paddle (the checkpoint in Paddle; the training package)"
    ),
    precision: Precision = typer.Option(
        Precision.fp32, "--precision", help="fp32, or int8: the quantized graphs of `aoanet-export --int8` (onnx)"
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="export directory (--backend onnx)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="checkpoint dir (--backend paddle)"),
    which: str = typer.Option("best", "--which", help="checkpoint weights: best | last (--backend paddle)"),
    split: Optional[str] = typer.Option(
        None, "--split", help="train | val | test | restval | all (a data dir with cocotalk.json; default test)"
    ),
    input_json: Optional[Path] = typer.Option(None, "--input-json", help="instead of DATA_DIR/cocotalk.json"),
    att_dir: Optional[Path] = typer.Option(None, "--att-dir", help="instead of DATA_DIR/cocobu_att"),
    beam_size: int = typer.Option(3, "--beam-size", min=1, help="1 = greedy"),
    batch_size: int = typer.Option(50, "--batch-size", min=1, help="images per encoder run / beam batch"),
    max_length: int = typer.Option(20, "--max-length", min=1),
    length_penalty: str = typer.Option("", "--length-penalty", help="'' (authors'), wu_<alpha> or avg_<alpha>"),
    block_trigrams: bool = typer.Option(False, "--block-trigrams"),
    remove_bad_endings: bool = typer.Option(False, "--remove-bad-endings"),
    num_images: int = typer.Option(
        -1, "--num-images", callback=_num_images, help="caption only the first N images (-1: all)"
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="compute threads per session (default: all CPUs / --streams)"
    ),
    streams: int = typer.Option(
        1, "--streams", min=1, help="batches decoded at once, each on its own thread (--backend onnx)"
    ),
    max_regions: int = typer.Option(
        DEFAULT_MAX_REGIONS, "--max-regions", min=1, help="refuse images with more regions (read from the headers)"
    ),
    max_batch_mb: int = typer.Option(
        DEFAULT_MAX_BATCH_BYTES // 2**20, "--max-batch-mb", min=1,
        help="estimated working memory per batch: images with many regions go in smaller batches",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    ray: bool = typer.Option(
        False, "--ray", help="run as a Ray Data job: --out is then a directory of JSONL shards + captions.json"
    ),
    address: Optional[str] = typer.Option(None, "--address", help="--ray: an existing Ray cluster (default: local)"),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="--ray: captioning actors (default: CPUs)"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="--ray: images per output shard"),
    attention: Optional[Path] = typer.Option(
        None, "--attention", help="also write DIR/<id>.png (where the model looked at each word) and DIR/<id>.json "
        "(the weights) per image",
    ),
) -> None:
    """Caption the images of a split, or pictures; prints the throughput (images/s) at the end."""
    run = report_errors("aoanet-infer", InferError, BackendError, FeatureError, ExportDirError, ImageError,
                        ExtractorError, ValueError)(_infer)
    run(out, features, backend, precision, model, checkpoint, which, split, input_json, att_dir, beam_size,
        batch_size, max_length, length_penalty, block_trigrams, remove_bad_endings, num_images, threads, streams,
        max_regions, max_batch_mb, progress, images, coco_ids, extractor, ray, address, actors, shard_size,
        attention)


def _infer(out, features, backend, precision, model, checkpoint, which, split, input_json, att_dir, beam_size,
           batch_size, max_length, length_penalty, block_trigrams, remove_bad_endings, num_images, threads, streams,
           max_regions, max_batch_mb, progress, pictures=None, coco_ids=False, extractor=None, ray=False,
           address=None, actors=None, shard_size=None, attention=None) -> None:
    if ray:  # --out is a directory of shards
        check_output_dir(out)
    else:
        check_output_file(out)  # before the work, not after it
    if attention is not None:
        if ray:
            raise InferError("--attention draws in one process: leave out --ray")
        check_output_folder(attention, "--attention")
    if pictures and (features is not None or input_json is not None or att_dir is not None):
        raise InferError("give either --images or --features, not both")
    if not pictures and features is None and input_json is None and att_dir is None:
        raise InferError("give --features DATA_DIR (or --input-json and --att-dir), or --images")
    if extractor is not None and (backend == "onnx" or not pictures):
        raise InferError("--extractor is for --images with --backend paddle (an export serves its own extractor)")
    if backend != "onnx" and precision is not Precision.fp32:
        raise InferError(
            f"--precision {precision.value} is for --backend onnx (the quantized graphs of an export dir); "
            f"--backend {backend} runs in fp32"
        )
    if backend != "onnx" and streams != 1:
        raise InferError(f"--streams is for --backend onnx; --backend {backend} decodes one batch at a time")
    length_penalty_fn(length_penalty)  # a bad spec fails here, not after the model is loaded
    has_json = input_json is not None or (features is not None and (features / INPUT_JSON).is_file())
    if split is not None and not has_json and not pictures:
        raise InferError(
            f"--split {split} selects images of a cocotalk.json; {features or att_dir} is a plain folder of feature "
            "files, captioned whole (leave --split out, or give --input-json)"
        )
    if pictures:
        images = list_image_files(pictures, coco_ids=coco_ids)
    else:
        images = list_images(features, split or "test", input_json=input_json, att_dir=att_dir)
    if num_images >= 0:
        images = images[:num_images]
    if not images:
        raise InferError("no images to caption")
    if ray:
        if backend != "onnx" or model is None:
            raise InferError("--ray runs the onnx backend: give --model EXPORT_DIR")
        if streams != 1:
            raise InferError("--streams is for one process; with --ray, --actors sets the parallelism")
        decoding = dict(beam_size=beam_size, max_length=max_length, batch_size=batch_size,
                        length_penalty=length_penalty, block_trigrams=block_trigrams,
                        remove_bad_endings=remove_bad_endings, max_regions=max_regions,
                        max_batch_bytes=max_batch_mb * 2**20)
        return _infer_with_ray(out, images, model, precision.value, address, actors, shard_size, progress, decoding,
                               pictures=bool(pictures))
    if backend == "onnx":
        if model is None:
            raise InferError("--backend onnx needs --model EXPORT_DIR")
        engine = load_backend("onnx", model=model, threads=threads, precision=precision.value, streams=streams)
    else:
        extra = {"extractor": extractor} if extractor is not None else {}
        engine = load_backend(backend, checkpoint=checkpoint, which=which, threads=threads, **extra)
    writer = None
    if attention is not None:
        if not getattr(engine, "has_attention", False):
            why = engine.no_attention_message() if hasattr(engine, "no_attention_message") else (
                f"the {backend} backend does not return attention weights")
            raise InferError(f"--attention: {why}")
        writer = AttentionWriter(attention, background=True)
    options: dict = {"block_trigrams": block_trigrams}
    if remove_bad_endings:
        options["bad_ending_ids"] = bad_ending_ids(engine.ix_to_word)
    if length_penalty:
        options["length_penalty"] = length_penalty
    start = time.perf_counter()
    try:
        if pictures:
            results = caption_pictures(
                engine, engine.image_extractor(), images, beam_size, max_length, batch_size, options,
                remove_bad_endings, progress, max_batch_bytes=max_batch_mb * 2**20, attention=writer,
            )
        else:
            results = caption_images(
                engine, images, beam_size, max_length, batch_size, options, remove_bad_endings, progress,
                max_regions, max_batch_mb * 2**20, attention=writer,
            )
    finally:
        if writer is not None:
            writer.close()  # every drawing done (or its error raised) before the captions are written
    seconds = time.perf_counter() - start
    write_json_atomic(out, results)
    typer.echo(
        f"wrote {len(results)} captions to {out} ({backend} {precision.value}, beam {beam_size}): "
        f"{len(results) / seconds:.2f} images/s ({seconds:.1f} s)"
    )
    if writer is not None:
        typer.echo(f"wrote the attention of {writer.written} image(s) to {attention} (<id>.png, <id>.json)")


def _infer_with_ray(out: Path, images, model: Path, precision: str, address, actors, shard_size, progress,
                    decoding: dict, pictures: bool = False) -> None:
    from aoanet_runtime import ray_infer
    from aoanet_runtime.contract import EXTRACTOR, EXTRACTOR_SPEC
    from aoanet_runtime.exportdir import load_manifest, read_model
    from aoanet_runtime.images import DEFAULT_MAX_PIXELS
    from aoanet_runtime.serve import model_id

    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise InferError("--ray needs Ray: pip install 'aoanet[runtime,serve]'") from None
    manifest = load_manifest(model)
    width = int(manifest["sizes"]["att_feat_size"])
    spec = ""
    if pictures:
        if EXTRACTOR not in manifest["files"]:
            raise InferError(f"{model} was exported without an image extractor: it captions region features "
                             f"(--features), not pictures")
        spec = read_model(model, manifest, EXTRACTOR_SPEC).decode("utf-8")  # checked against its sha256
    settings = {"model": model_id(model), "precision": precision, "decoding": decoding, "inputs":
                "pictures" if pictures else "features"}
    job = ray_infer.Job(out, images, shard_size or ray_infer.default_shard_size(len(images)), settings)
    start = time.perf_counter()
    try:
        results, computed = ray_infer.run(job, model, width, precision=precision, decoding=decoding, actors=actors,
                                          address=address, progress=progress, extractor_spec=spec,
                                          max_pixels=DEFAULT_MAX_PIXELS)
    except ray_infer.RayJobError as e:
        raise InferError(str(e)) from None
    seconds = time.perf_counter() - start
    write_json_atomic(out / ray_infer.MERGED, results)
    typer.echo(
        f"wrote {len(results)} captions to {out / ray_infer.MERGED} ({computed} of {len(job.shards)} shards "
        f"computed now, the others kept from an earlier run; {seconds:.1f} s)"
    )


def main(argv: list[str] | None = None) -> None:
    app(args=command_args(argv), prog_name="aoanet-infer")


if __name__ == "__main__":
    main()
