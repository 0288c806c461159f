"""Ray: the HTTP service (aoanet-serve) and the offline job (aoanet-infer --ray), on a local Ray instance bound to
127.0.0.1, with a bounded number of requests. Captions must equal offline aoanet-infer's for the same inputs."""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
from test_images import _huge_png, picture, write_pool_extractor
from test_runtime import F, make_checkpoint

from aoanet_export import export_checkpoint
from aoanet_runtime import cli as infer_cli
from aoanet_runtime import ray_infer, serve

N_REQUESTS, CONCURRENCY = 64, 16
TIMEOUT_S = 3.0  # the service's request timeout (the tests' requests take milliseconds)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """The test model with a hand-built image extractor of its feature width (tests/test_images.py), so that it
    captions feature files and pictures."""
    root = tmp_path_factory.mktemp("ray-export")
    out = root / "export"
    export_checkpoint(make_checkpoint(root / "ckpt"), out, extractor=write_pool_extractor(root / "extractor", F))
    return out


@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory) -> Path:
    """24 pictures of various sizes, JPEG and PNG."""
    folder = tmp_path_factory.mktemp("ray-pics")
    for i in range(24):
        size = (40 + 7 * i, 30 + 5 * (i % 5))
        picture(i, size).save(folder / f"{100 + i}.{'png' if i % 3 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def feature_folder(tmp_path_factory) -> Path:
    """N_REQUESTS images' region features, 1..12 regions each, as <id>.npy."""
    folder = tmp_path_factory.mktemp("ray-feats")
    rng = np.random.default_rng(7)
    for image_id in range(N_REQUESTS):
        k = int(rng.integers(1, 13))
        np.save(folder / f"{image_id}.npy", (np.abs(rng.standard_normal((k, F))) * 2).astype(np.float32))
    return folder


def offline_captions(export_dir: Path, folder: Path, out: Path, capsys, beam_size: int = 2,
                     pictures: bool = False) -> dict:
    with pytest.raises(SystemExit) as exc:
        infer_cli.main(["--model", str(export_dir), "--images" if pictures else "--features", str(folder), "--out",
                        str(out), "--beam-size", str(beam_size), "--no-progress"])
    assert not exc.value.code, capsys.readouterr().err
    return {r["image_id"]: r["caption"] for r in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def local_ray():
    serve.start_ray(None, num_cpus=2)
    yield
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(local_ray, export_dir):
    port = free_port()
    limits = serve.Limits(max_request_bytes=64 * 1024, max_regions=50, max_beam_size=4)
    # half a CPU reserved: the offline job's actors share this Ray instance
    serve.run_service(export_dir, port=port, max_batch_size=16, batch_wait_ms=50, limits=limits, threads=1,
                      cpus_per_replica=0.5, request_timeout_s=TIMEOUT_S, blocking=False)
    return f"http://127.0.0.1:{port}"


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:  # Serve's own answers (a timeout) are plain text
            return e.code, {"raw": text.decode(errors="replace")}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- the service
def test_service_batches_requests_and_matches_offline_captions(service, export_dir, feature_folder, tmp_path,
                                                               capsys):
    want = offline_captions(export_dir, feature_folder, tmp_path / "offline.json", capsys)
    status, health = request(f"{service}/healthz")
    assert status == 200 and health["status"] == "ok"

    def post(image_id: int):
        body = (feature_folder / f"{image_id}.npy").read_bytes()
        return image_id, *request(f"{service}/v1/captions?beam_size=2", body,
                                  {"Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(post, range(N_REQUESTS)))
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    got = {image_id: body["caption"] for image_id, _, body in answers}
    assert got == want
    assert max(body["batch_size"] for _, _, body in answers) > 1  # requests of different clients shared a batch
    models = {body["model"] for _, _, body in answers}
    status, described = request(f"{service}/v1/model")
    assert status == 200 and models == {described["model"]} and described["sizes"]["att_feat_size"] == F
    assert described["limits"]["max_regions"] == 50


def test_service_multipart_upload(service, feature_folder, export_dir):
    body = (feature_folder / "3.npy").read_bytes()
    boundary = "aoanet-test-boundary"
    multipart = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"3.npy\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + body + f"\r\n--{boundary}--\r\n".encode()
    status, answer = request(f"{service}/v1/captions?beam_size=2", multipart,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status_raw, raw = request(f"{service}/v1/captions?beam_size=2", body)
    assert status == status_raw == 200 and answer["caption"] == raw["caption"]


@pytest.mark.parametrize(
    "body, query, status, message",
    [
        (b"", "", 400, "empty body"),
        (b"this is not an image", "", 400, "not an image file"),
        (b"\xff\xd8\xff\xe0 a truncated JPEG", "", 400, "the request's image"),
        (b"\x93NUMPY garbage", "", 400, "not a valid .npy"),
        (npy_bytes(np.ones((3, F + 1), np.float32)), "", 400, f"shape (regions, {F})"),
        (npy_bytes(np.ones((51, F), np.float32)), "", 413, "1..50 are accepted"),
        (npy_bytes(np.full((2, F), np.nan, np.float32)), "", 400, "NaN"),
        (npy_bytes(np.full((2, F), 3e38, np.float32)), "", 422, "not finite"),
        (npy_bytes(np.array([{"a": 1}], dtype=object)), "", 400, "float array"),
        (npy_bytes(np.ones((2, F), np.float32)), "?beam_size=9", 400, "beam_size must be in 1..4"),
        (npy_bytes(np.ones((2, F), np.float32)), "?beam_size=two", 400, "beam_size must be an integer"),
        (b"x" * (64 * 1024 + 1), "", 413, "at most 65536"),
    ],
)
def test_service_refuses_bad_requests_and_keeps_serving(service, feature_folder, body, query, status, message):
    got, answer = request(f"{service}/v1/captions{query}", body)
    assert got == status and message in answer["error"], answer
    good, answer = request(f"{service}/v1/captions", (feature_folder / "0.npy").read_bytes())
    assert good == 200 and isinstance(answer["caption"], str)


def test_a_bad_input_in_a_batch_fails_alone(service, feature_folder):
    """Features whose magnitude makes the decoder's outputs non-finite, sent together with good requests: the bad
    one gets a 422 naming the problem, the others (captioned in the same batches) their captions."""
    huge = npy_bytes(np.full((2, F), 3e38, np.float32))
    bodies = [huge] + [(feature_folder / f"{i}.npy").read_bytes() for i in range(7)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: request(f"{service}/v1/captions?beam_size=2", b), bodies))
    assert answers[0][0] == 422 and "not finite" in answers[0][1]["error"]
    assert all(status == 200 for status, _ in answers[1:]), answers
    assert max(answer["batch_size"] for _, answer in answers[1:]) > 1
    alone = [request(f"{service}/v1/captions?beam_size=2", b)[1]["caption"] for b in bodies[1:]]
    assert [answer["caption"] for _, answer in answers[1:]] == alone


def test_service_captions_pictures_as_offline(service, export_dir, picture_folder, tmp_path, capsys):
    """Picture files posted concurrently get the captions `aoanet-infer --images` gives for the same files."""
    want = offline_captions(export_dir, picture_folder, tmp_path / "offline.json", capsys, pictures=True)
    files = sorted(picture_folder.iterdir())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: request(f"{service}/v1/captions?beam_size=2", p.read_bytes()), files))
    assert all(status == 200 for status, _ in answers), answers[:2]
    assert {int(p.stem): a["caption"] for p, (_, a) in zip(files, answers, strict=True)} == want
    assert max(a["batch_size"] for _, a in answers) > 1
    status, described = request(f"{service}/v1/model")
    assert described["inputs"] == ["features", "image"]


def test_service_refuses_a_huge_picture_from_its_header(service, tmp_path):
    body = _huge_png(tmp_path / "huge.png", 20000, 20000).read_bytes()
    assert len(body) < 1000
    status, answer = request(f"{service}/v1/captions", body)
    assert status == 413 and "too large" in answer["error"]


def test_a_model_without_extractor_refuses_pictures():
    with pytest.raises(serve.RequestError, match="captions region features") as e:
        serve.parse_request(b"\x89PNG...", "image/png", {}, F, serve.Limits(), 2, takes_images=False)
    assert e.value.status == 415


def test_service_unknown_route_and_method(service):
    assert request(f"{service}/v2/anything")[0] == 404
    assert request(f"{service}/v1/captions")[0] == 405


def test_a_request_that_times_out_frees_its_slot(service, export_dir, feature_folder):
    """A second application whose batches wait far longer than the request timeout unless full (2 requests), with
    room for 2 requests at a time: a lone request times out. Then 3 requests at once: if the timed-out request
    had kept its slot, only one more could enter and no batch could fill (at most 1 answer); with its slot freed,
    two enter, fill a batch and are answered, then the third (at least 2 answers, 3 when Serve fills the
    timed-out request's place in the batch queue with the next request)."""
    serve.run_service(export_dir, max_batch_size=2, batch_wait_ms=20_000, threads=1, cpus_per_replica=0.25,
                      max_ongoing_requests=2, name="aoanet-slow", route_prefix="/slow", blocking=False)
    body = (feature_folder / "0.npy").read_bytes()
    url = f"{service}/slow/v1/captions"
    start = time.perf_counter()
    status, _ = request(url, body)
    assert status in (408, 504) and time.perf_counter() - start < 3 * TIMEOUT_S
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: request(url, body), range(3)))
    answered = [answer for status, answer in answers if status == 200]
    assert len(answered) >= 2, answers
    assert all(status in (200, 408, 504) for status, _ in answers)


def test_serve_command_checks_before_starting_ray(export_dir, tmp_path, capsys, monkeypatch, caplog):
    with pytest.raises(SystemExit) as exc:
        serve.main(["--model", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "export directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        serve.main(["--model", str(export_dir), "--max-batch-size", "0"])
    assert exc.value.code == 2 and "--max-batch-size must be >= 1" in capsys.readouterr().err
    started = {}
    monkeypatch.setattr(serve, "start_ray", lambda address: started.setdefault("address", address))
    monkeypatch.setattr(serve, "run_service", lambda *a, **k: started.setdefault("host", k["host"]))
    with caplog.at_level("WARNING"):
        serve.main(["--model", str(export_dir)])
    assert started == {"address": None, "host": "127.0.0.1"} and "reachable from other machines" not in caplog.text
    started.clear()
    with caplog.at_level("WARNING"):
        serve.main(["--model", str(export_dir), "--host", "0.0.0.0"])
    assert started["host"] == "0.0.0.0" and "reachable from other machines" in caplog.text


# ---------------------------------------------------------------------------------------------- the offline job
def test_ray_job_equals_offline_and_resumes_by_shard(local_ray, export_dir, feature_folder, tmp_path, capsys):
    want = offline_captions(export_dir, feature_folder, tmp_path / "offline.json", capsys, beam_size=3)
    out = tmp_path / "job"

    def job_args(beam_size: int) -> list[str]:
        return ["--model", str(export_dir), "--features", str(feature_folder), "--out", str(out), "--beam-size",
                str(beam_size), "--ray", "--shard-size", "16", "--actors", "2", "--no-progress"]

    def run() -> str:
        with pytest.raises(SystemExit) as exc:
            infer_cli.main(job_args(3))
        captured = capsys.readouterr()
        assert not exc.value.code, captured.err
        return captured.out

    assert "4 of 4 shards computed now" in run()
    merged = json.loads((out / "captions.json").read_text())
    assert [r["image_id"] for r in merged] == sorted(want) and {r["image_id"]: r["caption"] for r in merged} == want
    shards = sorted(out.glob("part-*.jsonl"))
    assert len(shards) == 4 and not list(out.glob(".*.tmp"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()
    assert "1 of 4 shards computed now" in run()
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.jsonl"))}
    assert {k: v for k, v in after.items() if k != shards[2].name} == {
        k: v for k, v in before.items() if k != shards[2].name
    }
    assert json.loads((out / "captions.json").read_text()) == merged
    # another decoding setting into the same directory is refused: shards of two settings never mix
    with pytest.raises(SystemExit) as exc:
        infer_cli.main(job_args(2))
    assert exc.value.code == 1 and "holds the shards of another job" in capsys.readouterr().err


def test_ray_job_on_pictures_equals_offline(local_ray, export_dir, picture_folder, tmp_path, capsys):
    offline_captions(export_dir, picture_folder, tmp_path / "offline.json", capsys, pictures=True)
    want = json.loads((tmp_path / "offline.json").read_text())
    out = tmp_path / "job"
    with pytest.raises(SystemExit) as exc:
        infer_cli.main(["--model", str(export_dir), "--images", str(picture_folder), "--out", str(out),
                        "--beam-size", "2", "--ray", "--shard-size", "10", "--no-progress"])
    assert not exc.value.code, capsys.readouterr().err
    assert "3 of 3 shards computed now" in capsys.readouterr().out
    assert json.loads((out / "captions.json").read_text()) == want  # file names included


def test_ray_job_names_a_bad_feature_file(local_ray, export_dir, tmp_path, capsys):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "1.npy", np.ones((3, F), np.float32))
    np.save(folder / "2.npy", np.full((3, F), np.inf, np.float32))
    with pytest.raises(SystemExit) as exc:
        infer_cli.main(["--model", str(export_dir), "--features", str(folder), "--out", str(tmp_path / "job"),
                        "--ray", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    # one line for the job, one per bad file; not Ray's wrapped remote traceback
    assert "aoanet-infer: error: 1 file(s) could not be captioned" in err
    assert f"{folder / '2.npy'} (image id 2): features contain NaN or infinite values" in err.splitlines()
    assert "FeatureError" not in err and "RayTaskError" not in err
    assert not (tmp_path / "job" / ray_infer.MERGED).exists()
