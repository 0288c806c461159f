"""``aoanet-infer --ray``: the same captioning job as a Ray Data pipeline, for jobs larger than one machine.

    read the listing -> shards of ``shard_size`` images -> load (CPU tasks: read and check the feature files)
    -> caption (a pool of actors, one Captioner each, GPU when the cluster has one) -> ``OUT/part-XXXXX.jsonl``

Each shard is written atomically by the actor that captioned it, so a job that stops (killed, a node lost) keeps
its finished shards; running the same command again computes only the missing ones. ``OUT/job.json`` records
what the shards were made from (model, listing, decoding settings): a re-run with anything different is refused,
so shards of two settings never mix. At the end the shards are merged, in listing order, into
``OUT/captions.json``: the same file as ``aoanet-infer`` without ``--ray`` writes.

Inside a shard the images are decoded in the same batches as without Ray (``batch_plan`` over the shard), so the
captions are the same. Ray is imported only when the job runs (the ``serve`` extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoanet_runtime import atomic
from aoanet_runtime.features import ImageFile

JOB = "job.json"
MERGED = "captions.json"
JOB_FORMAT = "aoanet-ray-job/1"


class RayJobError(RuntimeError):
    """A job the command refuses (a mismatched output directory, a shard it cannot read)."""


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.jsonl"


def listing_digest(images: list[ImageFile]) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.image_id}\t{image.path}\n".encode())
    return h.hexdigest()


@dataclass
class Job:
    out_dir: Path
    images: list[ImageFile]
    shard_size: int
    settings: dict  # model id, precision, decoding options: what the shards depend on

    @property
    def shards(self) -> list[list[ImageFile]]:
        return [self.images[i : i + self.shard_size] for i in range(0, len(self.images), self.shard_size)]

    def description(self) -> dict:
        return {
            "format": JOB_FORMAT,
            "images": len(self.images),
            "listing_sha256": listing_digest(self.images),
            "shard_size": self.shard_size,
            **self.settings,
        }

    def prepare(self) -> list[int]:
        """Create or check ``OUT/job.json``; returns the indices of the shards still to compute."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / JOB
        want = self.description()
        if path.is_file():
            try:
                have = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RayJobError(f"{path} cannot be read ({e}); remove the directory to start over") from None
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if diff:
                raise RayJobError(
                    f"{self.out_dir} holds the shards of another job (differs in: {', '.join(diff)}); use another "
                    "--out, or remove it to start over"
                )
        elif any(self.out_dir.iterdir()):
            raise RayJobError(f"{self.out_dir} is not empty and holds no {JOB}: refusing to write shards into it")
        else:
            atomic.write_json(path, want, indent=1)
        count = len(self.shards)
        return [i for i, shard in enumerate(self.shards) if not self._complete(i, count, shard)]

    def _complete(self, index: int, count: int, shard: list[ImageFile]) -> bool:
        path = self.out_dir / shard_name(index, count)
        if not path.is_file():
            return False
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False  # written atomically, so only a tampered file gets here: computed again
        return [r.get("image_id") for r in rows] == [image.image_id for image in shard]

    def merge(self) -> list[dict]:
        """All shards, in listing order."""
        count, results = len(self.shards), []
        for index, shard in enumerate(self.shards):
            path = self.out_dir / shard_name(index, count)
            if not self._complete(index, count, shard):
                raise RayJobError(f"{path} is missing or does not list the shard's images")
            results += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return results


# ---------------------------------------------------------------------------------------------- pipeline stages
def _pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of one rank but various shapes -> (one flat float32 array, their shapes): a form every Ray Data
    block format carries as it is."""
    if not arrays:
        return np.zeros(0, np.float32), np.zeros((0, 0), np.int64)
    flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])
    return flat, np.asarray([a.shape for a in arrays], np.int64)


def _unpack(flat: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start : start + size].reshape([int(d) for d in shape]))
        start += size
    return out


def load_shard(row: dict) -> dict:
    """CPU task: read one shard's inputs. Feature files: header (shape, region limit) then the array, checked.
    Pictures: decoded and pre-processed as the extractor's spec says (``extractor`` holds the spec's JSON), so
    that the actors only run the graphs. A bad file does not fail the task: its message travels with the shard
    (``error``), so that the job reports every bad file in one line each, keeps the good shards, and never shows
    Ray's wrapped remote tracebacks."""
    from aoanet_runtime.extractor import ExtractorSpec, load_picture
    from aoanet_runtime.features import FeatureError, read_features, region_count
    from aoanet_runtime.images import ImageError

    pictures = bool(row["extractor"])
    spec = ExtractorSpec.from_json(json.loads(row["extractor"])) if pictures else None
    arrays, sizes, errors = [], [], []
    for image_id, path in zip(row["ids"], row["paths"], strict=True):
        try:
            if pictures:
                pixels, size = load_picture(path, spec, int(row["max_pixels"]))
                arrays.append(pixels)
                sizes.append(size)
            else:
                image = ImageFile(image_id, Path(path))
                region_count(image, int(row["width"]), row["max_regions"])  # the header first: bounded work
                arrays.append(read_features(image, int(row["width"])))
        except (FeatureError, ImageError) as e:
            errors.append(str(e))
    if errors:
        arrays, sizes = [], []
    flat, shapes = _pack(arrays)
    return {"shard": row["shard"], "data": flat, "shapes": shapes, "sizes": np.asarray(sizes, np.int64).reshape(-1, 2),
            "ids": row["ids"], "paths": row["paths"], "error": "\n".join(errors)}


class ShardCaptioner:
    """Actor: one Captioner, captions whole shards and writes each one's JSONL atomically."""

    def __init__(self, export_dir: str, precision: str, threads: int, out_dir: str, count: int, decoding: dict,
                 pictures: bool):
        from aoanet_runtime.captioner import Captioner

        self.captioner = Captioner.from_dir(export_dir, precision=precision, threads=threads)
        self.out_dir, self.count, self.decoding, self.pictures = Path(out_dir), count, decoding, pictures

    def _features(self, arrays: list[np.ndarray], sizes: np.ndarray) -> list[np.ndarray]:
        if not self.pictures:
            return arrays
        # The extractor on chunks of the decoder's batch size (its activations are what bounds the memory).
        step = int(self.decoding.get("batch_size", 50))
        feats = []
        for start in range(0, len(arrays), step):
            loaded = [(x, (int(w), int(h))) for x, (w, h) in zip(arrays[start : start + step],
                                                                 sizes[start : start + step], strict=True)]
            feats += [f.att for f in self.captioner.extractor.features_of(loaded)]
        return feats

    def __call__(self, batch: dict) -> dict:
        done = []
        for shard, flat, shapes, sizes, ids, paths, error in zip(
            batch["shard"], batch["data"], batch["shapes"], batch["sizes"], batch["ids"], batch["paths"],
            batch["error"], strict=True,
        ):
            done.append(int(shard))
            if error:
                continue
            feats = self._features(_unpack(flat, shapes), sizes)
            captions = self.captioner.caption(feats, **self.decoding).captions
            rows = [{"image_id": _plain(i), "caption": c} for i, c in zip(ids, captions, strict=True)]
            if self.pictures:  # as aoanet-infer --images writes them
                for r, path in zip(rows, paths, strict=True):
                    r["file_name"] = str(path)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic.write_text(self.out_dir / shard_name(int(shard), self.count), lines)
        return {"shard": np.asarray(done, np.int64), "images": np.asarray([len(i) for i in batch["ids"]], np.int64),
                "error": batch["error"]}


def _plain(value):
    """numpy scalars from Ray's columns back to the JSON types the listing had."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------------- the job
def run(job: Job, export_dir: Path, width: int, *, precision: str, decoding: dict, actors: int | None = None,
        address: str | None = None, progress: bool = True, extractor_spec: str = "",
        max_pixels: int | None = None) -> tuple[list[dict], int]:
    """Caption the job's missing shards on Ray; returns (merged results, number of shards computed).
    ``extractor_spec``: the export's extractor.json text when the job's files are pictures."""
    pending = job.prepare()
    count = len(job.shards)
    if pending:
        import ray

        from aoanet_runtime.serve import start_ray

        started_here = not ray.is_initialized()
        if started_here:
            start_ray(address)
        try:
            errors = _run_pipeline(job, pending, count, export_dir, width, precision, decoding, actors, progress,
                                   extractor_spec, max_pixels)
        finally:
            if started_here:
                ray.shutdown()
        if errors:
            raise RayJobError(
                f"{len(errors)} file(s) could not be captioned (their shards were not written; the other shards "
                "are kept for the next run):\n" + "\n".join(errors)
            )
    return job.merge(), len(pending)


def _run_pipeline(job, pending, count, export_dir, width, precision, decoding, actors, progress, extractor_spec,
                  max_pixels) -> list[str]:
    """Run the pipeline over the pending shards; returns the messages of the files that could not be read."""
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's per-stage progress and notices
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar of our own, by images
    context.enable_operator_progress_bars = False
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    # no more actors than shards to caption: an idle actor would hold its CPUs (or GPU) for nothing
    actors = max(1, min(actors or gpus or cpus, len(pending)))
    threads = max(1, cpus // actors) if not gpus else 1
    # Ray's CPU accounting: the actors reserve most of what is free now, the loading tasks (file reads) a little,
    # so that both stages fit beside whatever else runs on the cluster (a Serve application, other jobs) and
    # neither waits forever for the other's reservation.
    free = float(ray.available_resources().get("CPU", 0.0))
    actor_cpus = 0 if gpus else round(0.8 * min(cpus, free) / actors, 2)
    rows = [
        {
            "shard": i,
            "ids": [image.image_id for image in job.shards[i]],
            "paths": [str(image.path) for image in job.shards[i]],
            "width": width,
            "max_regions": decoding.get("max_regions"),
            "extractor": extractor_spec,
            "max_pixels": max_pixels or 0,
        }
        for i in pending
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(load_shard, num_cpus=0.1)
    captioned = dataset.map_batches(
        ShardCaptioner,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={
            "export_dir": str(Path(export_dir).resolve()),
            "precision": precision,
            "threads": threads,
            "out_dir": str(job.out_dir.resolve()),
            "count": count,
            "decoding": decoding,
            "pictures": bool(extractor_spec),
        },
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(job.shards[i]) for i in pending), unit="img", desc="captioning (ray)",
                   file=sys.stderr)
    errors = []
    try:
        for row in captioned.iter_rows():
            if row["error"]:
                errors += str(row["error"]).splitlines()
            if bar is not None:
                bar.update(int(row["images"]))
    finally:
        if bar is not None:
            bar.close()
    return errors


def default_shard_size(n_images: int) -> int:
    """Shards big enough to amortise the per-task overhead, small enough that a lost one costs little."""
    return int(min(1000, max(50, -(-n_images // max(1, 4 * (os.cpu_count() or 1))))))
