"""aoanet-export: a small random model through static graph and ONNX; manifest, parity and failure modes."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import paddle
import pytest

from aoanet.model import build_model
from aoanet.train.checkpoint import Checkpoint, CheckpointWriter, load_model, model_json_bytes, weights_bytes
from aoanet_export import ExportError, ParityError, export_checkpoint, parity
from aoanet_export import manifest as manifest_mod
from aoanet_export.onnx_convert import _rename_outputs, convert
from aoanet_export.static import StaticFiles, _saved_files
from aoanet_runtime.contract import FORMAT_VERSION, graph_specs

V = 30
R, E, F = 32, 32, 24
SMALL = dict(rnn_size=R, input_encoding_size=E, att_feat_size=F, num_heads=4, refine_layers=2)

# Paddle 3.x saves PIR graphs (.json) and needs paddle2onnx 2.x; Paddle 2.6 saves .pdmodel and needs 1.x.
PIR = bool(paddle.get_flags(["FLAGS_enable_pir_api"])["FLAGS_enable_pir_api"])
STATIC_FORMAT, STATIC_SUFFIX = ("pir", ".json") if PIR else ("pdmodel", ".pdmodel")
PADDLE2ONNX_VERSION = "2.1.0" if int(paddle.__version__.split(".")[0]) >= 3 else "1.3.1"


def make_checkpoint(directory: Path, seed: int = 0, weights_options: dict | None = None) -> Path:
    """A checkpoint dir of a random small model; ``weights_options``: save the weights of another model."""
    paddle.seed(seed)
    model = build_model(V, **SMALL)
    weights = build_model(V, **{**SMALL, **weights_options}) if weights_options else model
    files = {
        "model": model_json_bytes(model, {i: ("UNK" if i == V else f"w{i}") for i in range(1, V + 1)}),
        "weights_last": weights_bytes(weights),
    }
    CheckpointWriter(directory).save(files)  # no best weights: "best" falls back to the last
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "run")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "aoanet"
    return out, export_checkpoint(checkpoint, out, opset=17)


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def weight_shapes(model) -> list[list[int]]:
    """The shapes of a graph's constant tensors (initializers and Constant nodes)."""
    shapes = [list(t.dims) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            shapes += [list(a.t.dims) for a in node.attribute if a.name == "value"]
    return shapes


def dtype(value) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


# ---------------------------------------------------------------------------- the files
def test_onnx_graphs_have_the_contract_names_and_dynamic_axes(exported):
    out, _ = exported
    expected = {
        "encoder": (
            [
                ("att_feats", "float32", ["batch", "regions", F]),
                ("att_masks", "float32", ["batch", "regions"]),
            ],
            [
                ("mean_feats", "float32", ["batch", R]),
                ("p_att_feats", "float32", ["batch", "regions", 2 * R]),
                ("att_values", "float32", ["batch", 4, "regions", R // 4]),
                ("att_keys", "float32", ["batch", 4, "regions", R // 4]),
            ],
        ),
        "decoder": (
            [
                ("it", "int64", ["batch"]),
                ("state_h", "float32", [2, "batch", R]),
                ("state_c", "float32", [2, "batch", R]),
                ("mean_feats", "float32", ["batch", R]),
                ("att_values", "float32", ["images", 4, "regions", R // 4]),
                ("att_keys", "float32", ["images", 4, "regions", R // 4]),
                ("att_masks", "float32", ["images", "regions"]),
                ("topk", "int64", [1]),
            ],
            [
                ("logprobs", "float32", ["batch", V + 1]),
                ("next_state_h", "float32", [2, "batch", R]),
                ("next_state_c", "float32", [2, "batch", R]),
                ("attention", "float32", ["batch", 4, "regions"]),
                ("cand_logprobs", "float32", ["batch", "k"]),
                ("cand_ids", "int64", ["batch", "k"]),
            ],
        ),
    }
    for name, (inputs, outputs) in expected.items():
        model = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        if name == "decoder":  # x - logsumexp(x) became onnxruntime's much faster LogSoftmax
            ops = [n.op_type for n in model.graph.node]
            assert ops.count("LogSoftmax") == 1 and "ReduceLogSumExp" not in ops
            # the word embedding is folded into the LSTM: a [V+1, 4R] gate table, no [V+1, E] embedding
            assert [V + 1, 4 * R] in weight_shapes(model) and [V + 1, E] not in weight_shapes(model)
        assert [(v.name, dtype(v), dims(v)) for v in model.graph.input] == inputs
        assert [(v.name, dtype(v), dims(v)) for v in model.graph.output] == outputs
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
        produced = {x for node in model.graph.node for x in node.output}
        assert all(o.name in produced for o in model.graph.output)
        assert not any(x.startswith("fetch_name") for node in model.graph.node for x in node.output)


def test_manifest_fields_and_hashes(exported, checkpoint):
    import paddle2onnx

    out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model"] == "aoanet"
    assert manifest["ix_to_word"] == Checkpoint.open(checkpoint).model_meta()["ix_to_word"]
    assert manifest["ix_to_word"][str(V)] == "UNK"
    assert (manifest["bos_id"], manifest["eos_id"], manifest["pad_id"], manifest["unk_id"]) == (0, 0, 0, V)
    assert manifest["vocab_size"] == V
    sizes = manifest["sizes"]
    assert (sizes["rnn_size"], sizes["input_encoding_size"], sizes["att_feat_size"]) == (R, E, F)
    assert (sizes["num_heads"], sizes["refine_layers"], sizes["num_classes"]) == (4, 2, V + 1)
    decoding = manifest["decoding"]
    assert decoding["beam_size"] == 2 and decoding["max_length"] == 20
    assert decoding["length_penalty"] == "" and decoding["suppress_unk"] is True
    assert manifest["opset"] == 17 and manifest["decoder_step"] == "folded_embedding"
    assert manifest["source_checkpoint"]["which"] == "best"
    assert set(manifest["versions"]) >= {"paddle", "paddle2onnx", "onnx", "onnxruntime"}
    assert manifest["versions"]["paddle2onnx"] == paddle2onnx.__version__ == PADDLE2ONNX_VERSION
    assert manifest["versions"]["paddle"] == paddle.__version__
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry["bytes"] == (out / name).stat().st_size
    assert [t["name"] for t in manifest["files"]["decoder.onnx"]["outputs"]] == [
        "logprobs",
        "next_state_h",
        "next_state_c",
        "attention",
        "cand_logprobs",
        "cand_ids",
    ]
    src = manifest["source_checkpoint"]
    assert src["path"] == str(checkpoint.resolve()) and src["which"] == "best"
    last = Checkpoint.open(checkpoint).manifest["files"]["weights_last"]  # no best weights: falls back to the last
    assert (src["weights_file"], src["weights_sha256"]) == (last["path"], last["sha256"])
    assert manifest["parity"]["passed"] is True
    assert manifest_mod.verify(out) == manifest
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
        "parity.json",
        "static",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left


def test_verify_detects_a_changed_file(exported, tmp_path):
    out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="decoder.onnx does not match its sha256"):
        manifest_mod.verify(copy)


def test_static_graphs_load_in_paddle_inference(exported):
    out, manifest = exported
    from paddle import inference

    for name, inputs in (
        ("encoder", ["att_feats", "att_masks"]),
        ("decoder", ["it", "state_h", "state_c", "mean_feats", "att_values", "att_keys", "att_masks"]),
    ):
        entry = manifest["static"][name]
        assert entry["format"] == STATIC_FORMAT and entry["model_file"] == f"static/{name}{STATIC_SUFFIX}"
        assert entry["params_file"] == f"static/{name}.pdiparams"
        config = inference.Config(str(out / entry["model_file"]), str(out / entry["params_file"]))
        config.disable_glog_info()
        assert list(inference.create_predictor(config).get_input_names()) == inputs


# ---------------------------------------------------------------------------- parity
def test_parity_report_within_tolerance(exported):
    out, manifest = exported
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["steps"] == 20
    assert report["tolerance"] == {"logprobs": 1e-4, "attention": 1e-4}
    shapes = [(c["batch"], c["regions"]) for c in report["cases"]]
    assert (1, 1) in shapes
    assert any(c["ragged"] and len(set(c["lengths"])) > 1 for c in report["cases"])
    # beams: the graphs, fed each image's memory once, equal the dynamic graph fed it once per row
    assert any(c["beams"] > 1 and c["ragged"] for c in report["cases"])
    for backend in ("static", "onnx"):
        figures = report["max_abs_diff"][backend]
        assert set(figures) == set(parity.OUTPUTS) >= {"p_att_feats", "att_values", "att_keys", "logprobs", "attention"}
        assert figures["logprobs"] <= 1e-4
        assert figures["attention"] <= 1e-4  # the weights of the static graph and ONNX equal the model's
        assert max(figures.values()) < 1e-4
        assert report["min_argmax_agreement"][backend] == 1.0
    assert manifest["parity"]["max_abs_diff"] == report["max_abs_diff"]
    assert report["max_abs_diff_logprobs"] == max(
        report["max_abs_diff"][b]["logprobs"] for b in ("static", "onnx")
    )
    assert manifest["parity"]["max_abs_diff_logprobs"] == report["max_abs_diff_logprobs"]
    assert manifest["parity"]["max_abs_diff_attention"] == report["max_abs_diff_attention"] == max(
        report["max_abs_diff"][b]["attention"] for b in ("static", "onnx")
    )
    # The decoder's candidate head equalled numpy's top-4 of its log-probs at every step and row.
    rows = sum(c["batch"] * c["beams"] for c in report["cases"]) * report["steps"]
    assert report["candidates"] == {"k": 4, "rows": rows, "mismatched_rows": 0}
    assert manifest["parity"]["candidates"] == report["candidates"]


def test_onnxruntime_and_static_at_a_new_shape(exported, checkpoint):
    """A batch and region count not used at export (nor in its parity cases), ragged masks, 20 steps."""
    out, manifest = exported
    used = {(c[0], c[1]) for c in manifest["parity"]["cases"]}
    case = parity.Case(batch=21, regions=53, ragged=True, beams=2)
    assert (case.batch, case.regions) not in used and case.batch > max(b for b, _ in used)
    model, _ = load_model(checkpoint)
    feats, masks = parity.random_inputs(np.random.default_rng(7), case, F)
    backends = {
        "onnx": parity.OnnxBackend(out / "encoder.onnx", out / "decoder.onnx"),
        "static": parity.StaticBackend(
            *(
                StaticFiles(out / manifest["static"][n]["model_file"], out / manifest["static"][n]["params_file"])
                for n in ("encoder", "decoder")
            )
        ),
    }
    result = parity.compare(parity.DynamicBackend(model), backends, case, feats, masks, steps=20)
    for backend in backends:
        assert max(result["max_abs_diff"][backend].values()) <= 1e-4, result["max_abs_diff"]
        assert result["argmax_agreement"][backend] == 1.0


# ---------------------------------------------------------------------------- failures
def test_corrupted_checkpoint(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = Checkpoint.open(bad).path("weights_last")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=f"{weights.name} does not match .*checkpoint.json"):
        export_checkpoint(bad, tmp_path / "out")
    # an earlier version's checkpoint (pickled weights, no manifest) that is truncated
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model.json").write_bytes(Checkpoint.open(checkpoint).read("model"))
    (legacy / "model.pdparams").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.raises(ExportError, match="could not be read as Paddle weights"):
        export_checkpoint(legacy, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "legacy"]


def test_mismatched_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", weights_options=dict(rnn_size=16, input_encoding_size=16))
    with pytest.raises(ExportError, match="mis-shaped") as info:
        export_checkpoint(ckpt, tmp_path / "out")
    assert "[24, 16]" in str(info.value)  # att_embed.0.weight of the other model
    assert not (tmp_path / "out").exists()


def test_missing_paddle2onnx(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # makes `import paddle2onnx` raise ImportError
    with pytest.raises(ExportError, match="paddle2onnx is not installed"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_force_does_not_replace_a_foreign_directory_or_the_checkpoint(checkpoint, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not an export")
    with pytest.raises(ExportError, match="not an export directory"):
        export_checkpoint(checkpoint, foreign, force=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for out in (checkpoint, checkpoint.parent):
        with pytest.raises(ExportError, match="would replace the checkpoint"):
            export_checkpoint(checkpoint, out, force=True)
    assert (checkpoint / "checkpoint.json").is_file()


def test_paddle2onnx_failure_is_an_export_error(tmp_path):
    """paddle2onnx 2.x logs conversion errors and calls sys.exit(-1) (1.x returns nothing); neither may end the
    process."""
    model_file = tmp_path / f"m{STATIC_SUFFIX}"
    model_file.write_text("{}")
    (tmp_path / "m.pdiparams").write_bytes(b"x")
    inputs, outputs = graph_specs(V, R, F, 4)["encoder"]
    files = StaticFiles(model_file, tmp_path / "m.pdiparams")
    with pytest.raises(ExportError, match=f"paddle2onnx could not convert {model_file.name} at opset 17"):
        convert(files, tmp_path / "m.onnx", 17, inputs, outputs)
    assert not (tmp_path / "m.onnx").exists()


def test_paddle2onnx_1x_refuses_a_pir_graph(tmp_path, monkeypatch):
    """paddle2onnx 1.x (the one for Paddle 2.6) cannot read Paddle 3's PIR graphs: say so before trying."""
    import types

    monkeypatch.setitem(sys.modules, "paddle2onnx", types.SimpleNamespace(__version__="1.3.1"))
    inputs, outputs = graph_specs(V, R, F, 4)["encoder"]
    files = StaticFiles(tmp_path / "m.json", tmp_path / "m.pdiparams")
    with pytest.raises(ExportError, match=r"paddle2onnx 1\.3\.1 cannot read m\.json.*paddle2onnx==2\.1\.0"):
        convert(files, tmp_path / "m.onnx", 17, inputs, outputs)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_checkpoint(checkpoint, tmp_path / "out", opset=7)
    with pytest.raises(ExportError, match="which"):
        export_checkpoint(checkpoint, tmp_path / "out", which="newest")
    with pytest.raises(ExportError, match="is not a checkpoint directory: it has no checkpoint.json"):
        export_checkpoint(tmp_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused_and_untouched(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_checkpoint(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (
        out / "keep.txt"
    ).read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_parity_leaves_no_out_dir(checkpoint, tmp_path, monkeypatch):
    step = parity.OnnxBackend.step

    def corrupted(self, *args):
        logprobs, h, c, att = step(self, *args)
        return logprobs + np.float32(2e-4), h, c, att

    monkeypatch.setattr(parity.OnnxBackend, "step", corrupted)
    with pytest.raises(ParityError, match="log-prob") as info:
        export_checkpoint(checkpoint, tmp_path / "out")
    assert info.value.report["passed"] is False
    assert info.value.report["max_abs_diff"]["onnx"]["logprobs"] > 1e-4
    assert info.value.report["max_abs_diff"]["static"]["logprobs"] <= 1e-4
    assert list(tmp_path.iterdir()) == []


def test_attention_beyond_tolerance_fails_the_export(checkpoint, tmp_path, monkeypatch):
    """The attention weights are gated on their own: right log-probs with wrong weights fail too."""
    step = parity.StaticBackend.step

    def shifted(self, *args):
        logprobs, h, c, att = step(self, *args)
        return logprobs, h, c, np.roll(att, 1, axis=-1)

    monkeypatch.setattr(parity.StaticBackend, "step", shifted)
    with pytest.raises(ParityError, match="attention") as info:
        export_checkpoint(checkpoint, tmp_path / "out")
    report = info.value.report
    assert report["passed"] is False and report["max_abs_diff_logprobs"] <= 1e-4
    assert report["max_abs_diff"]["static"]["attention"] > 1e-4 >= report["max_abs_diff"]["onnx"]["attention"]
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_with_force_keeps_the_previous_export(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("previous export")
    with pytest.raises(ParityError):
        export_checkpoint(checkpoint, out, force=True, tolerance=-1.0)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- the command
def test_cli_replaces_with_force_at_another_opset(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from aoanet_export.cli import app

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a previous export
    (out / "stale.txt").write_text("x")
    runner = CliRunner()
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--which", "last", "--opset", "13"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "already exists" in refused.output
    result = runner.invoke(app, [*args, "--force", "--no-fold-embedding"])
    assert result.exit_code == 0, result.output
    assert "max |diff| of log-probs" in result.output
    assert not (out / "stale.txt").exists()
    manifest = manifest_mod.verify(out)
    assert manifest["opset"] == 13 and manifest["source_checkpoint"]["which"] == "last"
    assert manifest["decoder_step"] == "embedding" and manifest["parity"]["passed"] is True
    model = onnx.load(str(out / "decoder.onnx"))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 13
    # the plain step multiplies the embedding [V+1, E]; the folded one looks words up in a [V+1, 4R] gate table
    assert [V + 1, E] in weight_shapes(model) and [V + 1, 4 * R] not in weight_shapes(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- helpers
def test_saved_files_accepts_both_paddle_formats(tmp_path):
    for suffix, fmt in ((".json", "pir"), (".pdmodel", "pdmodel")):
        d = tmp_path / fmt
        d.mkdir()
        (d / f"encoder{suffix}").write_bytes(b"")
        (d / "encoder.pdiparams").write_bytes(b"")
        files = _saved_files(d / "encoder")
        assert files.format == fmt and files.model_file.name == f"encoder{suffix}"
    with pytest.raises(ExportError, match="wrote nothing"):
        _saved_files(tmp_path / "decoder")


def test_rename_outputs_handles_passthrough_and_consumers():
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = h.make_tensor_value_info("fetch_name_0", onnx.TensorProto.FLOAT, [1])
    z = h.make_tensor_value_info("fetch_name_1", onnx.TensorProto.FLOAT, [1])
    w = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    nodes = [
        h.make_node("Relu", ["x"], ["fetch_name_0"]),
        h.make_node("Neg", ["fetch_name_0"], ["fetch_name_1"]),
    ]
    model = h.make_model(h.make_graph(nodes, "g", [x], [y, z, w]))
    _rename_outputs(model, ["a", "b", "c"], StaticFiles(Path("m.json"), Path("m.pdiparams")))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["a", "b", "c"]
    assert [(list(n.input), list(n.output)) for n in model.graph.node] == [
        (["x"], ["a"]),
        (["a"], ["b"]),
        (["x"], ["c"]),
    ]


def _log_softmax_graph(axes, sub_inputs=("x", "lse2")):
    h = onnx.helper
    nodes = [
        h.make_node("Relu", ["x0"], ["x"]),
        h.make_node("ReduceLogSumExp", ["x"], ["lse"], axes=axes, keepdims=1),
        h.make_node("Identity", ["lse"], ["lse1"]),
        h.make_node("Identity", ["lse1"], ["lse2"]),
        h.make_node("Sub", list(sub_inputs), ["y"]),
        h.make_node("Neg", ["y"], ["out"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, ["batch", 7])],
        [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 7])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_candidate_head_orders_like_a_stable_descending_sort():
    """add_candidate_head on a graph whose output is its input behind paddle2onnx's Identity: onnxruntime's TopK
    must give numpy's stable descending order (ties to the lower id) and the values, for every k; the Identity
    in front of the output is bypassed (it would copy the log-probs at every step once the head reads them)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from aoanet_export.onnx_convert import add_candidate_head, bypass_output_identities

    vocab1 = 12
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["neg"]), helper.make_node("Identity", ["neg"], ["logprobs"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", vocab1])],
        [helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["batch", vocab1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert bypass_output_identities(model) == 1
    assert [(n.op_type, list(n.output)) for n in model.graph.node] == [("Neg", ["logprobs"])]
    add_candidate_head(model)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    lp = -rng.integers(0, 4, (64, vocab1)).astype(np.float32)  # many ties
    lp[0] = -2.0  # a row of equal values
    assert [i.name for i in session.get_inputs()] == ["x", "topk"]  # a required input, without a default
    assert not session.get_overridable_initializers()
    for k in (1, 4, vocab1):
        ids, values = session.run(["cand_ids", "cand_logprobs"], {"x": -lp, "topk": np.array([k])})
        want = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(values, np.take_along_axis(lp, want, axis=1))
    with pytest.raises(ExportError, match="no output 'logprobs'"):
        add_candidate_head(helper.make_model(helper.make_graph([], "empty", [], [])))


def test_bypass_output_identities_keeps_what_it_must():
    """An Identity of a graph input, of an output that has other consumers, or of another output stays."""
    from onnx import TensorProto, helper

    from aoanet_export.onnx_convert import bypass_output_identities

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])

    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),  # passes a graph input through
        helper.make_node("Neg", ["x"], ["n"]),
        helper.make_node("Identity", ["n"], ["b"]),  # n is also read by Abs
        helper.make_node("Abs", ["n"], ["c"]),
        helper.make_node("Identity", ["c"], ["d"]),  # c is a graph output itself
    ]
    graph = helper.make_graph(nodes, "g", [value("x")], [value(o) for o in "abcd"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert bypass_output_identities(model) == 0
    assert len(model.graph.node) == 5


def test_fuse_log_softmax_rewrites_only_the_exact_pattern():
    import onnxruntime as ort

    from aoanet_export.onnx_convert import fuse_log_softmax

    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32) * 10
    r = np.maximum(x.astype(np.float64), 0)
    expected = -(r - r.max(axis=1, keepdims=True) - np.log(np.exp(r - r.max(axis=1, keepdims=True)).sum(1))[:, None])
    model = _log_softmax_graph([-1])
    assert fuse_log_softmax(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu", "LogSoftmax", "Neg"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x0": x})[0], expected, atol=1e-5)  # float32 vs float64
    # not log-softmax over the last axis: left alone
    for other in (_log_softmax_graph([0]), _log_softmax_graph([-1], sub_inputs=("lse2", "x"))):
        before = [n.op_type for n in other.graph.node]
        assert fuse_log_softmax(other) == 0 and [n.op_type for n in other.graph.node] == before
