"""``aoanet-serve``: captions over HTTP, a Ray Serve application around the runtime's ``Captioner``.

    aoanet-serve --model EXPORT_DIR [--precision int8] [--replicas N] [--host 127.0.0.1] [--port 8000]
                 [--max-batch-size 32] [--batch-wait-ms 10] [--address RAY_ADDRESS]

Routes (JSON responses; errors are ``{"error": message}`` with a 4xx status, and the service keeps serving):

* ``POST /v1/captions``: the body is one input, raw (``Content-Type`` anything but multipart) or as the first file
  part of a ``multipart/form-data`` body: a ``.npy`` array of region features (``(regions, width)`` float,
  never unpickled), or an image (JPEG/PNG/...) when the export has an image extractor. Query ``beam_size``
  (1..``--max-beam-size``; default the manifest's). Answer: ``{"caption", "score", "model", "batch_size"}``,
  ``batch_size`` being how many requests were captioned together with this one.
* ``GET /healthz``: ``{"status": "ok"}`` once the model is loaded.
* ``GET /v1/model``: the manifest's public fields (model id, sizes, decoding defaults, vocabulary size, limits).

Requests from different clients are batched by Serve (``serve.batch``): one encoder run and one decoder step serve
every request of a batch. Each request's cost is bounded before any work: body bytes, image pixels (read from
the header), regions and feature width (from the ``.npy`` header), beam size. Ray is imported only here and in
``aoanet_runtime.ray_infer``, and only when used (the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import io
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aoanet_runtime.contract import MANIFEST
from aoanet_runtime.features import DEFAULT_MAX_REGIONS, read_npy_header

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Limits:
    """What one request may cost. Checked before decoding anything large."""

    max_request_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_regions: int = DEFAULT_MAX_REGIONS
    max_beam_size: int = 5


class RequestError(ValueError):
    """A request the service refuses: ``status`` is the HTTP status (4xx), the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class CaptionInput:
    kind: str  # "features" or "image"
    data: object  # float32 (K, F) array; for an image, its bytes, then (``prepare``) its pre-processed pixels
    beam_size: int


# ---------------------------------------------------------------------------------------------- parsing
def model_id(export_dir: Path) -> str:
    """A short, stable name of an export: the hash of its manifest (which hashes every model file)."""
    digest = hashlib.sha256((Path(export_dir) / MANIFEST).read_bytes()).hexdigest()
    return f"aoanet-{digest[:12]}"


def first_file_part(body: bytes, content_type: str) -> bytes:
    """The payload of the first file part of a multipart/form-data body (stdlib email parser: the body is
    already bounded in size)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise RequestError("malformed multipart/form-data body")
    parts = list(message.iter_parts())
    for part in parts:
        if part.get_filename() is not None:
            return part.get_payload(decode=True) or b""
    if parts:
        return parts[0].get_payload(decode=True) or b""
    raise RequestError("multipart/form-data body without a part")


def read_npy(data: bytes, width: int, limits: Limits) -> np.ndarray:
    """A ``(regions, width)`` float array from ``.npy`` bytes: header checked first (shape, dtype, size), then
    read without pickle; finite values only."""
    f = io.BytesIO(data)
    try:
        shape, dtype = read_npy_header(f)
    except (ValueError, EOFError) as e:
        raise RequestError(f"not a valid .npy array ({e})") from None
    if dtype.hasobject or not np.issubdtype(dtype, np.floating):
        raise RequestError(f"features must be a float array, got dtype {dtype}")
    if len(shape) != 2 or shape[1] != width:
        raise RequestError(f"features must have shape (regions, {width}), got {tuple(shape)}")
    if not 1 <= shape[0] <= limits.max_regions:
        raise RequestError(f"features have {shape[0]} regions; 1..{limits.max_regions} are accepted", status=413
                           if shape[0] > limits.max_regions else 400)
    if len(data) - f.tell() != int(np.prod(shape)) * dtype.itemsize:
        raise RequestError("the .npy data is truncated or has trailing bytes")
    array = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise RequestError("features contain NaN or infinite values")
    return array


def parse_request(body: bytes, content_type: str, query: dict, width: int, limits: Limits,
                  default_beam: int, takes_images: bool) -> CaptionInput:
    """One ``POST /v1/captions`` request -> what to caption, or RequestError."""
    if len(body) > limits.max_request_bytes:
        raise RequestError(f"the request body has {len(body)} bytes; at most {limits.max_request_bytes}", 413)
    if (content_type or "").lower().startswith("multipart/form-data"):
        body = first_file_part(body, content_type)
    if not body:
        raise RequestError("empty body: send an image or a .npy array of region features")
    beam_size = query.get("beam_size", default_beam)
    try:
        beam_size = int(beam_size)
    except (TypeError, ValueError):
        raise RequestError(f"beam_size must be an integer, got {beam_size!r}") from None
    if not 1 <= beam_size <= limits.max_beam_size:
        raise RequestError(f"beam_size must be in 1..{limits.max_beam_size}, got {beam_size}")
    if body.startswith(NPY_MAGIC):
        return CaptionInput("features", read_npy(body, width, limits), beam_size)
    if not takes_images:
        raise RequestError(
            f"this model captions region features: send a .npy array of shape (regions, {width}) (the body is "
            "not one; an export with an image extractor also takes images)", 415
        )
    return CaptionInput("image", body, beam_size)


# ---------------------------------------------------------------------------------------------- the service
class CaptionService:
    """The replica's state: one Captioner, the limits, and the batched captioning of a list of inputs. Plain
    Python (tested without Ray); ``deployment()`` wraps it for Serve."""

    def __init__(self, export_dir: str, precision: str = "fp32", limits: Limits | None = None,
                 threads: int | None = None):
        from aoanet_runtime.captioner import Captioner

        self.export_dir = Path(export_dir)
        self.captioner = Captioner.from_dir(self.export_dir, precision=precision, threads=threads)
        self.limits = limits or Limits()
        self.model_id = model_id(self.export_dir)
        self.default_beam = int(self.captioner.manifest.get("decoding", {}).get("beam_size", 2))
        self.default_beam = min(max(self.default_beam, 1), self.limits.max_beam_size)
        self.takes_images = self.captioner.has_extractor
        if self.takes_images:
            self.captioner.extractor.max_pixels = self.limits.max_image_pixels

    def parse(self, body: bytes, content_type: str, query: dict) -> CaptionInput:
        """The request's input, checked; an image is also decoded and pre-processed here, per request, so that a
        bad picture fails alone and before it joins a batch (its pixel count is checked from its header)."""
        from aoanet_runtime.images import ImageError, ImageTooLargeError

        item = parse_request(body, content_type, query, self.captioner.att_feat_size, self.limits,
                             self.default_beam, self.takes_images)
        if item.kind == "image":
            try:
                item.data = self.captioner.extractor.load(item.data, name="the request's image")
            except ImageTooLargeError as e:
                raise RequestError(str(e), 413) from None
            except ImageError as e:
                raise RequestError(str(e), 400) from None
        return item

    def caption_batch(self, inputs: list[CaptionInput]) -> list[dict]:
        """Caption a batch of requests: one call per beam size (and kind) covers all its requests. A failure of
        one image (e.g. an undecodable file) answers that request alone."""
        results: list[dict | None] = [None] * len(inputs)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(inputs):
            groups.setdefault((item.kind, item.beam_size), []).append(i)
        for (kind, beam_size), positions in groups.items():
            try:
                answers = self._caption(kind, [inputs[i].data for i in positions], beam_size, len(inputs))
            except ValueError:
                # One input the model cannot caption (non-finite outputs, an undecodable image) fails the call:
                # caption the group's inputs one by one, so that only the bad ones get an error.
                answers = []
                for i in positions:
                    try:
                        answers += self._caption(kind, [inputs[i].data], beam_size, len(inputs))
                    except ValueError as e:
                        answers.append({"error": str(e), "status": 422})
            for i, answer in zip(positions, answers, strict=True):
                results[i] = answer
        return results

    def _caption(self, kind: str, data: list, beam_size: int, batch_size: int) -> list[dict]:
        if kind == "image":  # pre-processed pixels: one extractor run for the batch's pictures
            data = [f.att for f in self.captioner.extractor.features_of(data)]
        out = self.captioner.caption(data, beam_size=beam_size, max_regions=self.limits.max_regions)
        return [self._answer(c, s, batch_size) for c, s in zip(out.captions, out.scores, strict=True)]

    def _answer(self, caption: str, score: float, batch_size: int) -> dict:
        return {"caption": caption, "score": float(score), "model": self.model_id, "batch_size": batch_size}

    def describe(self) -> dict:
        """The manifest's public fields (no paths, no hashes of the source checkpoint)."""
        m = self.captioner.manifest
        return {
            "model": self.model_id,
            "format_version": m.get("format_version"),
            "precision": self.captioner.precision,
            "vocab_size": m.get("vocab_size"),
            "sizes": m.get("sizes"),
            "decoding": m.get("decoding"),
            "inputs": ["features"] + (["image"] if self.takes_images else []),
            "limits": asdict(self.limits),
        }


def deployment(max_batch_size: int = 32, batch_wait_ms: float = 10.0, replicas: int = 1,
               cpus_per_replica: float = 1.0, max_ongoing_requests: int | None = None):
    """The Serve deployment class (Ray imported here)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    max_ongoing_requests = max_ongoing_requests or 2 * max_batch_size

    @serve.deployment(
        name="aoanet",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=16 * max_ongoing_requests,
    )
    class AoANetCaptions:
        def __init__(self, export_dir: str, precision: str, limits: dict, threads: int | None):
            self.service = CaptionService(export_dir, precision, Limits(**limits), threads)
            self.batched.set_max_batch_size(max_batch_size)
            self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def batched(self, inputs: list[CaptionInput]) -> list[dict]:
            # The decode is CPU work: on a thread, so the replica keeps accepting requests for the next batch.
            return await asyncio.to_thread(self.service.caption_batch, inputs)

        async def __call__(self, request: Request):
            # the path below the application's route prefix
            path = request.scope["path"][len(request.scope.get("root_path", "")):].rstrip("/") or "/"
            method = request.method
            try:
                if path == "/healthz" and method == "GET":
                    return JSONResponse({"status": "ok", "model": self.service.model_id})
                if path == "/v1/model" and method == "GET":
                    return JSONResponse(self.service.describe())
                if path == "/v1/captions":
                    if method != "POST":
                        raise RequestError("use POST with an image or a .npy array as the body", 405)
                    declared = request.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.service.limits.max_request_bytes:
                        raise RequestError(f"the request body has {declared} bytes; at most "
                                           f"{self.service.limits.max_request_bytes}", 413)
                    body = await _read_bounded(request, self.service.limits.max_request_bytes)
                    item = await asyncio.to_thread(self.service.parse, body, request.headers.get("content-type", ""),
                                                   dict(request.query_params))
                    result = await self.batched(item)
                    if "error" in result:
                        return JSONResponse({"error": result["error"]}, status_code=result.get("status", 400))
                    return JSONResponse(result)
                raise RequestError(f"no route {method} {path}; see GET /v1/model", 404)
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)

    return AoANetCaptions


async def _read_bounded(request, limit: int) -> bytes:
    """The body, refusing it as soon as it passes ``limit`` bytes (a client may send more than it declared)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body exceeds {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- running
def start_ray(address: str | None, num_cpus: int | None = None):
    """Join the cluster at ``address``, or start a local Ray instance (no dashboard).

    Ray's own services (GCS, raylet, workers) listen where Ray decides (it maps loopback to the node's address)
    and take only connections that present the session's token (Ray's token authentication, on by default);
    the HTTP service is this module's and binds ``--host`` (127.0.0.1 by default)."""
    import ray

    if address:
        return ray.init(address=address, log_to_driver=False)
    return ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)


def run_service(export_dir: Path, *, precision: str = "fp32", replicas: int = 1, host: str = DEFAULT_HOST,
                port: int = 8000, max_batch_size: int = 32, batch_wait_ms: float = 10.0, address: str | None = None,
                limits: Limits | None = None, request_timeout_s: float = 60.0, threads: int | None = None,
                cpus_per_replica: float | None = None, max_ongoing_requests: int | None = None,
                name: str = "aoanet", route_prefix: str = "/", blocking: bool = True):
    """Start Serve on ``host:port`` with the captioning application; returns the app's handle (``blocking``:
    serve until interrupted). ``cpus_per_replica``: the CPUs Ray reserves for each replica (default: this
    machine's CPUs shared by the replicas; 1 on an existing cluster); ``threads``: onnxruntime's threads per
    session in a replica (default: the reserved CPUs, at least 1); ``max_ongoing_requests``: requests a replica
    holds at once (default twice the batch size; more wait in Serve's queue, which is bounded too).
    ``request_timeout_s`` applies to the whole Serve instance and is set by its first start."""
    from ray import serve

    limits = limits or Limits()
    if cpus_per_replica is None:
        cpus_per_replica = (os.cpu_count() or 1) / replicas if not address else 1.0
    threads = threads or max(1, int(cpus_per_replica))
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    app = deployment(max_batch_size, batch_wait_ms, replicas, cpus_per_replica, max_ongoing_requests).bind(
        str(Path(export_dir).resolve()), precision, asdict(limits), threads
    )
    handle = serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    if blocking:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        serve.shutdown()
    return handle


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="aoanet-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="export directory (aoanet-export)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: a local instance)")
    parser.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels)
    parser.add_argument("--max-regions", type=int, default=Limits.max_regions)
    parser.add_argument("--max-beam-size", type=int, default=Limits.max_beam_size)
    parser.add_argument("--request-timeout-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads per replica (default: the CPUs reserved for it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in ("replicas", "max_batch_size", "max_request_bytes", "max_image_pixels", "max_regions",
                     "max_beam_size"):
            if getattr(args, name) < 1:
                raise RequestError(f"--{name.replace('_', '-')} must be >= 1")
        if args.threads is not None and args.threads < 1:
            raise RequestError("--threads must be >= 1")
        if args.batch_wait_ms < 0 or args.request_timeout_s <= 0:
            raise RequestError("--batch-wait-ms must be >= 0 and --request-timeout-s > 0")
        from aoanet_runtime.exportdir import load_manifest

        load_manifest(args.model)  # a bad export directory fails here, before Ray starts
        try:
            import ray  # noqa: F401
            from ray import serve  # noqa: F401
        except ImportError:
            raise RequestError("aoanet-serve needs Ray Serve: pip install 'aoanet[runtime,serve]'") from None
    except (RequestError, ValueError, RuntimeError) as e:
        print(f"aoanet-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("aoanet-serve: binding %s: the service is reachable from other machines", args.host)
    limits = Limits(args.max_request_bytes, args.max_image_pixels, args.max_regions, args.max_beam_size)
    start_ray(args.address)
    log.info("aoanet-serve: serving %s on http://%s:%d (POST /v1/captions, GET /healthz, GET /v1/model)",
             args.model, args.host, args.port)
    run_service(args.model, precision=args.precision, replicas=args.replicas, host=args.host, port=args.port,
                max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, address=args.address,
                limits=limits, request_timeout_s=args.request_timeout_s, threads=args.threads)


if __name__ == "__main__":
    main()

