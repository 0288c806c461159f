"""The onnxruntime captioner and aoanet-infer: parity with the Paddle model's decode, input and export-dir
errors, the CLI's output, and that the runtime works where Paddle cannot be imported.

One small random model (its decoder weights scaled so that captions end at varied lengths, which exercises the
search's early stop and row dropping), exported once for the module.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from aoanet.model import build_model
from aoanet.train.checkpoint import load_model, save_model_dir
from aoanet_export import export_checkpoint
from aoanet_runtime import Captioner, ExportDirError, FeatureError
from aoanet_runtime import cli as infer_cli
from aoanet_runtime.captioner import in_streams
from aoanet_runtime.features import ImageFile, batch_plan, list_images, pad_batch, read_features, region_count
from aoanet_runtime.sessions import default_threads

ROOT = Path(__file__).resolve().parents[1]
V, R, F = 40, 32, 16
SMALL = dict(rnn_size=R, input_encoding_size=R, att_feat_size=F, num_heads=4, refine_layers=2)
B, N = 24, 10


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(directory: Path) -> Path:
    paddle.seed(1)
    model = build_model(V, **SMALL)
    state = model.state_dict()
    # Random weights give captions that end at once or never; sharper decoder dynamics and an EOS bias give
    # lengths 0..20 (measured: greedy and beam 3 both mix short, medium and full-length captions).
    for name, value in state.items():
        if name.startswith("core.") and "norm" not in name:
            value.set_value(value.numpy() * 4)
    bias = state["logit.bias"].numpy() * 2
    bias[0] += 1.5
    state["logit.weight"].set_value(state["logit.weight"].numpy() * 2)
    state["logit.bias"].set_value(bias)
    ix_to_word = {str(i): ("UNK" if i == V else f"w{i}") for i in range(1, V + 1)}
    ix_to_word["3"] = "the"  # a bad-ending word, for remove_bad_endings
    save_model_dir(directory, model, ix_to_word)
    return directory


def random_batch(seed: int = 0, batch: int = B, regions: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = (np.abs(rng.standard_normal((batch, regions, F))) * 2).astype(np.float32)
    lengths = rng.integers(1, regions + 1, batch)
    lengths[0] = regions
    masks = (np.arange(regions)[None] < lengths[:, None]).astype(np.float32)
    return feats * masks[:, :, None], masks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "run")


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "aoanet"
    export_checkpoint(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0]


@pytest.fixture(scope="module")
def captioner(export_dir) -> Captioner:
    return Captioner.from_dir(export_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The reference layout: cocotalk.json + cocobu_att/<id>.npz, 30 images, a third in each split."""
    root = tmp_path_factory.mktemp("data")
    (root / "cocobu_att").mkdir()
    rng = np.random.default_rng(3)
    images = []
    for i in range(30):
        image_id = 500 + 7 * i
        k = int(rng.integers(1, 12))
        feat = (np.abs(rng.standard_normal((k, F))) * 2).astype(np.float32)
        np.savez_compressed(root / "cocobu_att" / f"{image_id}.npz", feat=feat)
        images.append({"id": image_id, "split": ("train", "val", "test")[i % 3], "file_path": f"{image_id}.jpg"})
    (root / "cocotalk.json").write_text(json.dumps({"ix_to_word": {}, "images": images}))
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        infer_cli.main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_onnx_and_paddle_give_identical_captions(model, captioner, beam_size):
    parity = _load_script("parity_infer")
    batches = [random_batch(0), random_batch(1, batch=7, regions=4)]
    report = parity.compare_backends(model, captioner, batches, beam_size)
    assert report["images"] == B + 7
    assert report["captions_differ"] == 0, report
    assert report["max_abs_logprob_diff"] <= 1e-4 and report["max_abs_score_diff"] <= 1e-4, report
    # The model is varied enough for the test to mean something: short, long and full-length captions.
    lengths = (captioner.decode(*batches[0], beam_size).seqs > 0).sum(axis=1)
    assert len(set(lengths.tolist())) >= 3 and lengths.max() == 20 and lengths.min() < 10


def test_decoder_memory_per_image_equals_memory_per_row(captioner):
    """The runtime feeds the decoder each image's memory (keys, values, mask) once for its K beams; the same graph
    fed the memory repeated per row gives the same log-probs and states over chained steps."""
    feats, masks = random_batch(3)
    mean, values, keys = captioner.encode(feats, masks)
    k = 3
    rows = feats.shape[0] * k
    per_image = {"att_values": values, "att_keys": keys, "att_masks": masks}
    per_row = {name: np.repeat(x, k, axis=0) for name, x in per_image.items()}
    it = np.zeros(rows, np.int64)
    states = {"image": (np.zeros((2, rows, R), np.float32),) * 2, "row": (np.zeros((2, rows, R), np.float32),) * 2}
    for _ in range(4):
        out = {}
        for form, memory in (("image", per_image), ("row", per_row)):
            h, c = states[form]
            feeds = {"it": it, "state_h": h, "state_c": c, "mean_feats": np.repeat(mean, k, axis=0), **memory,
                     "topk": np.array([1], np.int64)}
            out[form] = captioner.decoder.run(["logprobs", "next_state_h", "next_state_c"], feeds)
            states[form] = tuple(out[form][1:])
        for a, b in zip(out["image"], out["row"], strict=True):  # the same products, another summation order
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        it = out["image"][0].argmax(axis=1)


def test_memory_on_the_device_gives_the_same_results(captioner):
    """device_memory (the memory held as OrtValues on the decoder's device, re-sent when finished images are
    dropped; the default on CUDA) gives the same results as host feeds, here on the CPU; every decoder run took
    the OrtValues."""
    assert not captioner.device_memory  # the CPU default
    calls = collections.Counter()

    class Spy:  # counts the two ways of running the decoder
        def __getattr__(self, name):
            if name in ("run", "run_with_ort_values"):
                calls[name] += 1
            return getattr(captioner.decoder, name)

    bound = Captioner(captioner.encoder, Spy(), captioner.manifest, device_memory=True)
    to_device = bound._to_device

    def counted(memory):
        calls["to_device"] += 1
        return to_device(memory)

    bound._to_device = counted
    feats, masks = random_batch(4)
    for beam_size, options in [(1, {}), (2, {}), (3, {}), (3, {"block_trigrams": True}), (2, {"early_stop": False})]:
        calls.clear()
        a = captioner.decode(feats, masks, beam_size, **options)
        b = bound.decode(feats, masks, beam_size, **options)
        np.testing.assert_array_equal(a.seqs, b.seqs)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.n_steps == b.n_steps and calls["run_with_ort_values"] == b.n_steps and not calls["run"], calls
        if beam_size == 1:  # greedy drops each image as it ends: the memory was sent again, with fewer images
            assert calls["to_device"] > 1 and len(set((a.seqs > 0).sum(axis=1).tolist())) > 1


def test_candidate_head_gives_the_same_results_as_the_log_probs(captioner):
    """The decoder's candidate head (top-k words fetched from the graph) and the full log-probs searched in numpy
    give the same captions, scores, per-token log-probs and step counts, for greedy and beam search, with and
    without UNK suppression and a length penalty; the head is really what the search read."""
    assert captioner.has_candidate_head

    class WithoutHead:  # the same graph, presented as a decoder without the candidate head (format 2)
        def get_inputs(self):
            return [i for i in captioner.decoder.get_inputs() if i.name != "topk"]

        def run(self, names, feeds):
            return captioner.decoder.run(names, {**feeds, "topk": np.array([1], np.int64)})

        def __getattr__(self, name):
            return getattr(captioner.decoder, name)

    full = Captioner(captioner.encoder, WithoutHead(), captioner.manifest)
    assert not full.has_candidate_head
    fetched = []
    run = captioner.decoder.run

    class Spy:  # records the outputs each decoder run fetched
        def run(self, names, feeds):
            fetched.append(tuple(names))
            return run(names, feeds)

        def __getattr__(self, name):
            return getattr(captioner.decoder, name)

    head = Captioner(captioner.encoder, Spy(), captioner.manifest)
    feats, masks = random_batch(4)
    cases = [(1, {}), (2, {}), (3, {}), (3, {"suppress_unk": False}), (3, {"length_penalty": "wu_0.7"})]
    for beam_size, options in cases:
        fetched.clear()
        a, b = head.decode(feats, masks, beam_size, **options), full.decode(feats, masks, beam_size, **options)
        np.testing.assert_array_equal(a.seqs, b.seqs)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.n_steps == b.n_steps == len(fetched)
        assert all("cand_ids" in names and "logprobs" not in names for names in fetched)
    # Constraints need every log-prob: then the head is not used.
    fetched.clear()
    a = head.decode(feats, masks, 3, block_trigrams=True)
    np.testing.assert_array_equal(a.seqs, full.decode(feats, masks, 3, block_trigrams=True).seqs)
    assert fetched and all("logprobs" in names and "cand_ids" not in names for names in fetched)


def test_beam_search_refuses_candidates_that_cannot_stand_for_the_log_probs():
    from aoanet_runtime.beam import Candidates, beam_search, greedy

    def step_with(k):
        def step(it, ctx):
            lp = np.log(np.full((it.size, V + 1), 1.0 / (V + 1), np.float32))
            return Candidates(np.tile(np.arange(k), (it.size, 1)), lp[:, :k], V + 1), ctx

        return step

    def search(step, **kw):
        return beam_search(step, lambda c, i: c, None, None, 2, 3, max_length=4, unk_idx=V, **kw)

    assert search(step_with(4)).seqs.shape == (2, 4)  # K + 1 words with the UNK penalty: enough
    assert search(step_with(3), suppress_unk=False).seqs.shape == (2, 4)  # K without it
    with pytest.raises(ValueError, match="hold 3 words per row, the search needs 4"):
        search(step_with(3))
    with pytest.raises(ValueError, match="need the full log-probs"):
        search(step_with(4), block_trigrams=True)
    with pytest.raises(ValueError, match="need the full log-probs"):
        greedy(step_with(1), None, 2, max_length=3, bad_ending_ids=[3])


def test_parity_with_the_optional_constraints(model, captioner):
    parity = _load_script("parity_infer")
    options = dict(length_penalty="wu_0.5", block_trigrams=True, bad_ending_ids=np.array([3]))
    report = parity.compare_backends(model, captioner, [random_batch(2)], 3, **options)
    assert report["passed"], report


def test_caption_matches_decode_and_keeps_input_order(captioner):
    feats, masks = random_batch(0)
    padded = captioner.caption(feats, masks, beam_size=2, batch_size=5)
    direct = captioner.decode(feats, masks, 2)
    np.testing.assert_array_equal(padded.seqs, direct.seqs)
    # The same images as a ragged list: regrouped by region count, results back in input order.
    ragged = [f[: int(m.sum())] for f, m in zip(feats, masks, strict=True)]
    listed = captioner.caption(ragged, beam_size=2, batch_size=B)
    np.testing.assert_array_equal(listed.seqs, direct.seqs)
    assert listed.captions == padded.captions and len(listed) == B
    assert all(isinstance(c, str) for c in listed.captions)
    np.testing.assert_allclose(listed.scores, direct.scores, atol=1e-4)


def test_streams_decode_batches_concurrently_with_the_same_results(export_dir, captioner):
    feats, masks = random_batch(3)
    ragged = [f[: int(m.sum())] for f, m in zip(feats, masks, strict=True)]
    alone = captioner.caption(ragged, beam_size=2, batch_size=5)
    sizes = []
    streamed = Captioner.from_dir(export_dir, streams=3)
    assert streamed.streams == 3
    assert streamed.decoder.get_session_options().intra_op_num_threads == max(1, default_threads() // 3)
    together = streamed.caption(ragged, beam_size=2, batch_size=5, on_batch=sizes.append)
    assert together.captions == alone.captions
    np.testing.assert_array_equal(together.seqs, alone.seqs)
    np.testing.assert_allclose(together.scores, alone.scores, atol=1e-5)
    assert sum(sizes) == B and len(sizes) == len(batch_plan([len(f) for f in ragged], 5)) > 3
    with pytest.raises(ValueError, match="streams"):
        Captioner.from_dir(export_dir, streams=0)


def test_in_streams_keeps_order_and_raises_the_first_error():
    started = []

    def work(i):
        started.append(i)
        if i == 4:
            raise FeatureError("image 4 is broken")
        time.sleep(0.01)
        return i * i

    for streams in (1, 3):
        assert list(in_streams(lambda i: i * i, list(range(9)), streams)) == [i * i for i in range(9)]
    started.clear()
    results = in_streams(work, list(range(200)), 2)
    with pytest.raises(FeatureError, match="image 4"):
        list(results)
    assert 4 in started and len(started) < 50  # the calls not yet started were cancelled


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_refused_clearly(captioner):
    feats, masks = random_batch(0, batch=2, regions=3)
    with pytest.raises(FeatureError, match=f"width 7, the model expects {F}"):
        captioner.caption(np.zeros((2, 3, 7), np.float32))
    with pytest.raises(FeatureError, match=f"image 1: feature width 9, the model expects {F}"):
        captioner.caption([feats[0], np.zeros((3, 9), np.float32)])
    with pytest.raises(FeatureError, match="image 1: 0 regions"):
        captioner.caption([feats[0], np.zeros((0, F), np.float32)])
    with pytest.raises(FeatureError, match="image 1 has 0 regions"):
        captioner.caption(feats, np.array([[1, 1, 0], [0, 0, 0]], np.float32))
    with pytest.raises(FeatureError, match="0 regions"):
        captioner.caption(np.zeros((2, 0, F), np.float32))
    with pytest.raises(FeatureError, match="NaN"):
        captioner.caption([np.full((2, F), np.nan, np.float32)])
    with pytest.raises(FeatureError, match="list of per-image"):
        captioner.caption(feats[0])
    assert len(captioner.caption([])) == 0


def _copy_export(export_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("manifest.json", "encoder.onnx", "decoder.onnx"):
        shutil.copy(export_dir / name, dest / name)
    return dest


def test_export_dir_checks(export_dir, tmp_path):
    with pytest.raises(ExportDirError, match="manifest.json is missing"):
        Captioner.from_dir(tmp_path)
    bad_version = _copy_export(export_dir, tmp_path / "v99")
    manifest = json.loads((bad_version / "manifest.json").read_text())
    (bad_version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ExportDirError, match="unknown format_version 99"):
        Captioner.from_dir(bad_version)
    tampered = _copy_export(export_dir, tmp_path / "tampered")
    data = bytearray((tampered / "decoder.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"decoder\.onnx does not match its sha256"):
        Captioner.from_dir(tampered)
    assert Captioner.from_dir(tampered, verify=False).vocab_size == V  # the check is what refused it


def test_session_options(captioner):
    options = captioner.decoder.get_session_options()
    assert options.inter_op_num_threads == 1 and options.intra_op_num_threads >= 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert captioner.providers[-1] == "CPUExecutionProvider"


# ---------------------------------------------------------------------------------------------- no paddle
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('paddle', 'aoanet', 'export', 'paddle2onnx', 'torch'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Blocker())
try:
    import paddle
    raise SystemExit('paddle was importable')
except ImportError:
    pass
"""


def run_without_paddle(code: str) -> dict:
    """Run ``code`` (which leaves its captions in ``r``) in a fresh interpreter where importing paddle fails;
    returns its captions and the paddle/aoanet/export modules it loaded."""
    report = """
import json
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('paddle', 'aoanet', 'export'))
print(json.dumps({'captions': r.captions, 'loaded': loaded}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + code + report], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_works_where_paddle_cannot_be_imported(export_dir, data_dir, tmp_path):
    out = tmp_path / "captions.json"
    code = f"""
import json, numpy as np
from aoanet_runtime import Captioner
from aoanet_runtime.cli import main
c = Captioner.from_dir({str(export_dir)!r})
rng = np.random.default_rng(0)
r = c.caption([np.abs(rng.standard_normal((k, {F}))).astype(np.float32) for k in (3, 1, 5)], beam_size=2)
assert len(r.captions) == 3
try:
    main(['--model', {str(export_dir)!r}, '--features', {str(data_dir)!r}, '--out', {str(out)!r},
          '--no-progress'])
except SystemExit as e:
    assert not e.code, e.code
"""
    report = run_without_paddle(code)
    assert report["loaded"] == [] and len(report["captions"]) == 3
    assert len(json.loads(out.read_text())) == 10  # the test split


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_backends_write_identical_results(export_dir, checkpoint, data_dir, tmp_path, capsys):
    results = {}
    for backend, source in (
        ("onnx", ["--model", str(export_dir)]),
        ("paddle", ["--checkpoint", str(checkpoint)]),
    ):
        out = tmp_path / f"{backend}.json"
        code, stdout, err = run_cli(
            [
                "--backend",
                backend,
                *source,
                "--features",
                str(data_dir),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ],
            capsys,
        )
        assert code == 0, err
        assert "images/s" in stdout
        results[backend] = out.read_text()
    assert results["onnx"] == results["paddle"]
    out = tmp_path / "streams.json"
    args = ["--features", str(data_dir), "--out", str(out), "--batch-size", "4", "--streams", "2"]
    code, _, err = run_cli(["--model", str(export_dir), *args], capsys)
    assert code == 0, err
    assert out.read_text() == results["onnx"]
    code, _, err = run_cli(["--backend", "paddle", "--checkpoint", str(checkpoint), *args], capsys)
    assert code == 1 and "--streams is for --backend onnx" in err
    captions = json.loads(results["onnx"])
    test_ids = [500 + 7 * i for i in range(30) if i % 3 == 2]
    assert [c["image_id"] for c in captions] == test_ids  # the split, in cocotalk.json's order
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    assert len({c["caption"] for c in captions}) > 1


def test_cli_reads_a_plain_folder_and_overrides(export_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "feats"
    folder.mkdir()
    feat = np.abs(np.random.default_rng(0).standard_normal((4, F))).astype(np.float32)
    np.save(folder / "12.npy", feat)
    np.savez(folder / "3.npz", feat=feat[:2])
    np.save(folder / "abc.npy", feat[:1])
    out = tmp_path / "plain.json"
    code, _, err = run_cli(["--model", str(export_dir), "--features", str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    assert [c["image_id"] for c in json.loads(out.read_text())] == [3, 12, "abc"]
    # --input-json / --att-dir instead of a data dir; greedy; the val split
    code, _, err = run_cli(
        [
            "--model",
            str(export_dir),
            "--input-json",
            str(data_dir / "cocotalk.json"),
            "--att-dir",
            str(data_dir / "cocobu_att"),
            "--split",
            "val",
            "--beam-size",
            "1",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert [c["image_id"] for c in json.loads(out.read_text())] == [500 + 7 * i for i in range(30) if i % 3 == 1]


def _broken_data(data_dir: Path, dest: Path, image_id: int, feat) -> Path:
    shutil.copytree(data_dir, dest)
    path = dest / "cocobu_att" / f"{image_id}.npz"
    if feat is None:
        path.write_bytes(b"")
    else:
        np.savez_compressed(path, feat=feat)
    return dest


@pytest.mark.parametrize(
    "feat, message",
    [
        (None, "cannot read the feature file"),
        (np.zeros((3, F + 1), np.float32), f"feature width {F + 1}, the model expects {F}"),
        (np.zeros((0, F), np.float32), "0 regions"),
    ],
    ids=["empty-file", "wrong-width", "no-regions"],
)
def test_cli_bad_features_fail_without_output(export_dir, data_dir, tmp_path, capsys, feat, message):
    last_test_image = 500 + 7 * 29
    data = _broken_data(data_dir, tmp_path / "data", last_test_image, feat)
    out = tmp_path / "captions.json"
    code, _, err = run_cli(["--model", str(export_dir), "--features", str(data), "--out", str(out)], capsys)
    assert code == 1
    assert message in err and f"{last_test_image}.npz (image id {last_test_image})" in err
    assert not out.exists() and not list(tmp_path.glob(".captions.json*"))


def test_cli_refuses_a_bad_export_dir(export_dir, data_dir, tmp_path, capsys):
    bad = _copy_export(export_dir, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))  # an older export
    out = tmp_path / "captions.json"
    code, _, err = run_cli(["--model", str(bad), "--features", str(data_dir), "--out", str(out)], capsys)
    assert code == 1 and "unknown format_version 1" in err and "re-export" in err and "manifest.json" in err
    assert not out.exists()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "encoder.onnx").write_bytes((bad / "encoder.onnx").read_bytes() + b"\0")
    code, _, err = run_cli(["--model", str(bad), "--features", str(data_dir), "--out", str(out)], capsys)
    assert code == 1 and "encoder.onnx does not match its sha256" in err and not out.exists()


# ---------------------------------------------------------------------------------------------- features
def test_feature_helpers(data_dir, tmp_path):
    images = list_images(data_dir, "train")  # train includes restval; here: a third of the images
    assert len(images) == 10 and all(isinstance(i.image_id, int) for i in images)
    counts = [region_count(img, F) for img in images]
    assert counts == [read_features(img, F).shape[0] for img in images]
    plan = batch_plan(counts, 4)
    assert sorted(np.concatenate(plan).tolist()) == list(range(10)) and max(len(p) for p in plan) == 4
    att, mask = pad_batch([read_features(images[i], F) for i in plan[0]])
    assert att.shape[:2] == mask.shape and mask.sum(axis=1).tolist() == [counts[i] for i in plan[0]]
    with pytest.raises(FeatureError, match="split 'bogus'"):
        list_images(data_dir, "bogus")
    np.savez(tmp_path / "7.npz", other=np.zeros((2, F)))
    with pytest.raises(FeatureError, match=r"image id 7\): no array 'feat'"):
        read_features(ImageFile(7, tmp_path / "7.npz"))
    with pytest.raises(FeatureError, match="missing"):
        region_count(ImageFile(8, tmp_path / "8.npz"))


# ---------------------------------------------------------------------------------------------- bounds
def _huge_header_npy(path: Path, regions: int, width: int) -> None:
    """A .npy whose header claims (regions, width) float32 but holds one row: only a header-only check can refuse it
    for its region count (decoding it would fail otherwise)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (regions, width)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(width, np.float32).tobytes())


@pytest.mark.parametrize("backend", ["onnx", "paddle"])
def test_cli_refuses_too_many_regions_from_the_header(backend, export_dir, checkpoint, tmp_path, capsys):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "1.npy", np.ones((5, F), np.float32))
    _huge_header_npy(folder / "2.npy", 20_000, F)
    engine = ["--model", str(export_dir)] if backend == "onnx" else ["--checkpoint", str(checkpoint)]
    out = tmp_path / "c.json"
    code, _, err = run_cli(["--backend", backend, *engine, "--features", str(folder), "--out", str(out)], capsys)
    assert code == 1 and "2.npy (image id 2): 20000 regions, over the limit of 1000 per image" in err, err
    assert "--max-regions" in err and not out.exists()
    code, _, err = run_cli(["--backend", backend, *engine, "--features", str(folder), "--out", str(out),
                            "--max-regions", "4"], capsys)
    assert code == 1 and "1.npy (image id 1): 5 regions, over the limit of 4" in err


def test_batches_are_bounded_in_memory(captioner):
    from aoanet_runtime.features import MemoryModel

    full = MemoryModel(att_feat_size=2048, rnn_size=1024, num_heads=8)
    # real detectors' 10-100 regions at the default budget: batches of batch_size, as before
    counts = np.random.default_rng(0).integers(10, 101, 500)
    plan = batch_plan(counts, 50, full)
    assert [len(p) for p in plan] == [50] * 10
    assert [p.tolist() for p in plan] == [p.tolist() for p in batch_plan(counts, 50)]
    # 1000 regions per image: fewer images per batch, each batch within the budget
    counts = np.array([1000] * 30 + [50] * 40)
    plan = batch_plan(counts, 50, full)
    for pos in plan:
        assert full.batch_bytes(len(pos), counts[pos].max()) <= 2 * 2**30
    assert len(plan[0]) == (2 * 2**30 - full.BATCH_BYTES) // full.image_bytes(1000) < 50
    assert sorted(np.concatenate(plan).tolist()) == list(range(70))
    # one image over the budget alone: an error naming it
    with pytest.raises(FeatureError, match=r"image #1: 5000 regions need ~\d+ MB"):
        batch_plan([10, 5000], 50, full)
    # the captioner: a small budget gives more batches and the same captions
    feats = [random_batch(s, batch=1, regions=r)[0][0] for s, r in enumerate([3, 9, 5, 10, 1, 7])]
    whole = captioner.caption(feats, beam_size=2)
    batches = []
    budget = captioner.memory_model.batch_bytes(2, 10)  # two images of 10 regions
    small = captioner.caption(feats, beam_size=2, max_batch_bytes=budget, on_batch=batches.append)
    assert small.captions == whole.captions and len(batches) == 3
    with pytest.raises(FeatureError, match="image 3: 10 regions, over the limit of 9"):
        captioner.caption(feats, max_regions=9)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_non_finite_outputs_are_an_error_naming_the_image(beam_size, captioner, model, export_dir, checkpoint,
                                                          data_dir, tmp_path, capsys):
    from aoanet_runtime import NonFiniteError

    feats, masks = random_batch(0, batch=4)
    feats[2] = np.where(masks[2][:, None] > 0, np.float32(3e38), np.float32(0))  # finite; the model's sums overflow
    assert np.isfinite(feats).all()
    with pytest.raises(NonFiniteError) as info:
        captioner.decode(feats, masks, beam_size)
    assert info.value.images == [2]
    with pytest.raises(NonFiniteError, match=r"image\(s\) \[2\]: the decoder's outputs are not finite"):
        captioner.caption([f[: int(m.sum())] for f, m in zip(feats, masks)], beam_size=beam_size)
    with pytest.raises(NonFiniteError) as info:  # the Paddle model's decode runs the same search
        model.decode(paddle.to_tensor(feats), paddle.to_tensor(masks), beam_size=beam_size)
    assert info.value.images == [2]
    # the command, both backends: exit 1 naming the file and the image id, nothing written
    data = _broken_data(data_dir, tmp_path / "data", 500 + 7 * 5, np.full((3, F), 3e38, np.float32))
    out = tmp_path / "c.json"
    for engine in (["--backend", "onnx", "--model", str(export_dir)],
                   ["--backend", "paddle", "--checkpoint", str(checkpoint)]):
        code, _, err = run_cli([*engine, "--features", str(data), "--out", str(out), "--beam-size", str(beam_size)],
                               capsys)
        assert code == 1 and f"{500 + 7 * 5}.npz (image id {500 + 7 * 5})" in err, err
        assert "not finite" in err and "3e+38" in err and not out.exists()


def test_cli_checks_its_arguments_and_out_before_the_work(export_dir, data_dir, tmp_path, capsys):
    # --out a directory, or under a file: refused before the model is even loaded (the model dir does not exist)
    for out in (tmp_path, tmp_path / "file.txt" / "c.json"):
        (tmp_path / "file.txt").write_text("x")
        code, _, err = run_cli(["--model", str(tmp_path / "nope"), "--features", str(data_dir), "--out", str(out)],
                               capsys)
        assert code == 1 and "--out" in err and "nope" not in err, err
        assert len(err.strip().splitlines()) == 1
    # --split on a plain folder, --num-images below -1
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "1.npy", np.ones((2, F), np.float32))
    code, _, err = run_cli(["--model", str(export_dir), "--features", str(folder), "--split", "val", "--out",
                            str(tmp_path / "c.json")], capsys)
    assert code == 1 and "--split val selects images of a cocotalk.json" in err
    code, _, err = run_cli(["--model", str(export_dir), "--features", str(folder), "--num-images", "-5", "--out",
                            str(tmp_path / "c.json")], capsys)
    assert code == 2 and "-5" in err
