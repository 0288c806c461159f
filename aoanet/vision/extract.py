"""``aoanet-data extract``: pictures -> region features in the reference layout, through an image extractor.

For every picture: ``cocobu_att/<id>.npz`` (key ``feat``, the N cells x F, float32), ``cocobu_fc/<id>.npy`` (the
extractor's fc_feats, or the mean of the cells) and ``cocobu_box/<id>.npy`` (the cells' boxes in the picture's
pixels, x1 y1 x2 y2, as cocobu_box). The extractor itself is copied into ``DATA/extractor/`` (graph + spec): it is
the record of where the features came from, which training copies into the checkpoint and the export serves with.

Resumable: a picture whose three files exist is skipped (each file is written atomically, the box file last), so
an interrupted run is simply started again; features of two different extractors are never mixed in one
directory. Every picture is first checked from its header; pictures that fail then or while being decoded are
collected, and the run ends with one error listing every bad file (the good ones are written), or, with
``skip_bad``, goes on without them and lists them in the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aoanet.data.errors import DataError
from aoanet.data.features import att_path, feature_dirs, npy_path, write_image_features
from aoanet_runtime.contract import EXTRACTOR, EXTRACTOR_FILES, EXTRACTOR_SPEC
from aoanet_runtime.exportdir import sha256_file
from aoanet_runtime.extractor import Extractor, ExtractorError
from aoanet_runtime.images import ImageError, list_image_files, probe

EXTRACTOR_DIR = "extractor"  # DATA/extractor: the copy of the extractor the features came from


def extractor_hashes(directory: Path) -> dict[str, str]:
    return {name: sha256_file(Path(directory) / name) for name in EXTRACTOR_FILES}


def extractor_record(att_dir, att_feat_size: int | None = None) -> dict | None:
    """What training records about the features' extractor: ``{"dir", "backbone", "feature_width", "sha256":
    {file: hash}, "spec": {...}}`` from ``<data dir>/extractor`` (the parent of ``att_dir``), or None when the
    features did not come from one (bottom-up or generated features). Checks the width against the model's."""
    directory = Path(att_dir).resolve().parent / EXTRACTOR_DIR
    if not (directory / EXTRACTOR_SPEC).is_file():
        return None
    try:
        spec = json.loads((directory / EXTRACTOR_SPEC).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{directory / EXTRACTOR_SPEC}: cannot read the extractor's spec ({e})") from None
    if not (directory / EXTRACTOR).is_file():
        raise DataError(f"{directory}: {EXTRACTOR_SPEC} without {EXTRACTOR}")
    width = spec.get("feature_width")
    if att_feat_size is not None and width != att_feat_size:
        raise DataError(
            f"{directory / EXTRACTOR_SPEC}: the features are {width}-d ({spec.get('backbone')}), the model's "
            f"att_feat_size is {att_feat_size}"
        )
    return {
        "dir": str(directory),
        "backbone": spec.get("backbone"),
        "feature_width": width,
        "sha256": extractor_hashes(directory),
        "spec": spec,
    }


def _install_extractor(source: Path, data_dir: Path) -> Path:
    """Copy the extractor into DATA/extractor, or check that the one there is the same."""
    target = data_dir / EXTRACTOR_DIR
    want = extractor_hashes(source)
    if target.exists():
        have = extractor_hashes(target) if all((target / n).is_file() for n in EXTRACTOR_FILES) else {}
        if have != want:
            raise DataError(
                f"{target} holds another extractor than {source} (sha256 differ): the features in {data_dir} came "
                "from it, and features of two extractors cannot be mixed; extract into another directory"
            )
        return target
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{EXTRACTOR_DIR}.tmp-"))
    try:
        for name in EXTRACTOR_FILES:
            shutil.copyfile(source / name, tmp / name)
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _done(dirs, image_id) -> bool:
    att_dir, fc_dir, box_dir = dirs
    return att_path(att_dir, image_id).is_file() and npy_path(fc_dir, image_id).is_file() and (
        npy_path(box_dir, image_id).is_file()
    )


def extract_features(
    images: list,
    extractor_dir,
    out_dir,
    batch_size: int = 32,
    skip_bad: bool = False,
    coco_ids: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Extract the features of ``images`` (directories, list files or picture files) into ``out_dir``.

    Returns a summary; raises DataError listing every bad picture (unless ``skip_bad``)."""
    start = time.perf_counter()
    out_dir, extractor_dir = Path(out_dir), Path(extractor_dir)
    try:
        refs = list_image_files(images, coco_ids=coco_ids)
        extractor = Extractor.from_dir(extractor_dir, threads=threads)
    except (ImageError, ExtractorError) as e:
        raise DataError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    _install_extractor(extractor_dir, out_dir)
    dirs = feature_dirs(out_dir)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)

    bad: dict[Path, str] = {}
    todo = []
    skipped = 0
    for ref in refs:
        if _done(dirs, ref.image_id):
            skipped += 1
            continue
        try:
            probe(ref.path, extractor.max_pixels, extractor.spec.min_side)
        except ImageError as e:
            bad[ref.path] = str(e)
            continue
        todo.append(ref)

    def load(ref):
        try:
            return extractor.load(ref.path)
        except ImageError as e:
            return e

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="extracting", file=sys.stderr)
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    written = 0

    def write(items):
        for ref, f in items:
            write_image_features(*dirs, ref.image_id, f.att, f.boxes, fc=f.fc)
        return len(items)

    # Pictures are decoded on two threads and the files written on a third (compression, fsync) while onnxruntime
    # runs the next batch: the stages overlap instead of taking turns.
    try:
        with ThreadPoolExecutor(max_workers=2) as loaders, ThreadPoolExecutor(max_workers=1) as writer:
            pending = [loaders.map(load, c) for c in chunks[:1]]
            writes = []
            for k, chunk in enumerate(chunks):
                loaded = list(pending[k])
                if k + 1 < len(chunks):
                    pending.append(loaders.map(load, chunks[k + 1]))
                good = [(ref, x) for ref, x in zip(chunk, loaded) if not isinstance(x, ImageError)]
                for ref, x in zip(chunk, loaded):
                    if isinstance(x, ImageError):
                        bad[ref.path] = str(x)
                if good:
                    feats = extractor.features_of([x for _, x in good])
                    writes.append(writer.submit(write, [(ref, f) for (ref, _), f in zip(good, feats)]))
                while len(writes) > 2:  # bounded memory: at most two batches waiting to be written
                    written += writes.pop(0).result()
                if bar is not None:
                    bar.update(len(chunk))
            for w in writes:
                written += w.result()
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "images": len(refs),
        "extracted": written,
        "already_done": skipped,
        "bad": len(bad),
        "backbone": extractor.spec.backbone,
        "feature_width": extractor.spec.feature_width,
        "seconds": round(time.perf_counter() - start, 1),
        "out": str(out_dir),
    }
    if bad:
        lines = [f"{message}" for message in bad.values()]
        text = f"{len(bad)} of {len(refs)} picture(s) cannot be used:\n  " + "\n  ".join(lines)
        if not skip_bad:
            raise DataError(
                text + f"\n{written} good picture(s) were extracted; fix or remove the bad ones and run again "
                "(finished pictures are skipped), or pass --skip-bad to go on without them"
            )
        summary["skipped_bad"] = [str(p) for p in bad]
    return summary
