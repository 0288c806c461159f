"""The int8 variant of the export (``aoanet-export --int8``) and of the runtime (``precision="int8"``,
``aoanet-infer --precision int8``): files, hashes, quantized graphs, closeness to fp32, errors.

The model is test_runtime's (random weights, decoder dynamics sharpened so that captions end at varied lengths),
exported once for the module through the command. int8 is lossy, so the checks against fp32 have tolerances,
each set from measurements on this model (the constants; docs/int8.md, "The tests' tolerances").
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_runtime import SMALL, F, R, V, make_checkpoint, random_batch, run_cli, run_without_paddle
from typer.testing import CliRunner

from aoanet_export import ExportError, export_checkpoint, quantize
from aoanet_export import manifest as manifest_mod
from aoanet_runtime import Captioner, ExportDirError
from aoanet_runtime import sessions as sessions_mod
from aoanet_runtime.contract import FORMAT_VERSION
from aoanet_runtime.sessions import (
    CPU,
    INT8_PRECISION_OPTION,
    cpu_has_int8_dot,
    int8_session_entries,
    session_options,
)

INT8 = {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}

# One decoder step, int8 vs fp32 graph, 24 rows of random inputs: 3x the largest differences measured over 50
# seeds on VNNI and AVX2-only CPUs, to allow for other CPUs' int8 kernels; still far below the spread of this
# model's log-probs within a row, so a broken graph fails (docs/int8.md, "The tests' tolerances").
STEP_MAX_TOLERANCE, STEP_MEAN_TOLERANCE = 0.15, 0.03
# Captions equal to fp32's, beam 2, 240 images (10 batches of 24): about 4 standard errors below what was measured
# on VNNI and AVX2-only CPUs. Random weights with sharpened dynamics make close calls between tokens common, so the
# figure is well below a trained model's (docs/int8.md, "The tests' tolerances").
MIN_CAPTIONS_EQUAL = 0.6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "run")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """An export with the int8 graphs, made by the command; (export dir, the command's output)."""
    from aoanet_export.cli import app

    out = tmp_path_factory.mktemp("export") / "aoanet"
    result = CliRunner().invoke(app, ["--checkpoint", str(checkpoint), "--out", str(out), "--int8"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def export_dir(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """A plain folder of <id>.npy region features."""
    folder = tmp_path_factory.mktemp("feats")
    rng = np.random.default_rng(11)
    for image_id in range(12):
        k = int(rng.integers(1, 12))
        np.save(folder / f"{image_id}.npy", (np.abs(rng.standard_normal((k, F))) * 2).astype(np.float32))
    return folder


def _session(path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session as the runtime makes them (its options: int8 without u8 x s8 saturation on CPUs without VNNI)."""
    options = options or session_options(threads=1)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=[CPU])


def _signature(model) -> list:
    def describe(values):
        return [
            (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    return [describe(model.graph.input), describe(model.graph.output)]


# ---------------------------------------------------------------------------------------------- the export
def test_int8_files_are_hashed_in_the_manifest(exported):
    out, output = exported
    manifest = manifest_mod.verify(out)  # every listed file matches its sha256
    assert manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", *INT8.values()}
    for name in INT8.values():
        entry = manifest["files"][name]
        assert entry["sha256"] == manifest_mod.sha256_file(out / name) and entry["bytes"] == (out / name).stat().st_size
        fp32 = manifest["files"][name.replace(".int8", "")]
        assert (entry["inputs"], entry["outputs"]) == (fp32["inputs"], fp32["outputs"])
    q = manifest["int8"]
    assert q["weight_type"] == "QInt8" and q["per_channel"] is quantize.PER_CHANNEL
    assert q["graphs"]["encoder"]["quantized_nodes"] and q["graphs"]["decoder"]["quantized_nodes"]
    # Measured at export against the fp32 graphs on the parity inputs; the bounds leave room for every CPU measured
    # with the runtime's INT8_PRECISION_OPTION and fail under u8 x s8 saturation (docs/int8.md, "The tests'
    # tolerances").
    assert 0 < q["max_abs_diff_logprobs"] < 0.5 and q["max_abs_diff"]["logprobs"] == q["max_abs_diff_logprobs"]
    assert all(np.isfinite(v) for v in q["max_abs_diff"].values())
    assert q["measured_on"] == {
        "cpu_int8_dot_product": cpu_has_int8_dot(),
        "session_options": {} if cpu_has_int8_dot() else {"session.x64quantprecision": "1"},
    }
    assert q["argmax_agreement"] >= 0.9 and q["min_argmax_agreement"] <= q["argmax_agreement"]
    # the int8 decoder's candidate head equals numpy's top-k of its own log-probs at every step
    assert q["candidates"]["rows"] > 0 and q["candidates"]["mismatched_rows"] == 0
    assert manifest["parity"]["passed"] is True  # the fp32 graphs' guarantee is unchanged
    assert "int8 graphs vs fp32" in output and "argmax agreement" in output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "parity.json", "static", "encoder.onnx", "decoder.onnx", *INT8.values()]
    )


def test_every_exported_graph_loads_without_a_warning(export_dir):
    """onnxruntime, with its default options and logging, prints nothing when it loads any exported graph, fp32 or
    int8: no unused constants, no initializer listed as an input (export.onnx_convert.prune_unused; topk is a plain
    input)."""
    files = [export_dir / name for name in ("encoder.onnx", "decoder.onnx", *INT8.values())]
    code = (
        "import sys, onnxruntime as ort\n"
        "for f in sys.argv[1:]: ort.InferenceSession(f, providers=['CPUExecutionProvider'])"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr[:2000]


def test_int8_graphs_are_quantized_smaller_and_keep_the_contract(export_dir):
    for name, int8_name in INT8.items():
        fp32, int8 = onnx.load(str(export_dir / f"{name}.onnx")), onnx.load(str(export_dir / int8_name))
        onnx.checker.check_model(int8)
        assert _signature(int8) == _signature(fp32)
        ops = [n.op_type for n in int8.graph.node]
        # encoder: att_embed, q/k/v + AoA per refiner layer, ctx2att; decoder: the LSTM's recurrent product (the
        # word's share is a folded table), the attention query, att2ctx, logit
        assert ops.count("MatMulInteger") == {"encoder": 2 + 4 * SMALL["refine_layers"], "decoder": 4}[name], ops
        # Every matmul left in float multiplies two activations (attention); none has a constant weight.
        constants = {t.name for t in int8.graph.initializer} | {
            o for n in int8.graph.node if n.op_type == "Constant" for o in n.output
        }
        assert not [n.name for n in int8.graph.node if n.op_type in ("MatMul", "Gemm") and constants & set(n.input)]
        # a fixed part of a small model's file is graph structure, so its ratio is well above the full-size 0.25
        # (docs/int8.md, "The tests' tolerances")
        assert (export_dir / int8_name).stat().st_size < 0.6 * (export_dir / f"{name}.onnx").stat().st_size


def test_int8_decoder_step_is_close_to_fp32(export_dir):
    encoder = _session(export_dir / "encoder.onnx")
    fp32, int8 = _session(export_dir / "decoder.onnx"), _session(export_dir / INT8["decoder"])
    worst_max, worst_mean = 0.0, 0.0
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        feats, masks = random_batch(seed)
        mean_feats, values, keys = encoder.run(
            ["mean_feats", "att_values", "att_keys"], {"att_feats": feats, "att_masks": masks}
        )
        rows = len(feats)
        feeds = {
            "it": rng.integers(0, V + 1, rows).astype(np.int64),
            "state_h": (rng.standard_normal((2, rows, R)) * 0.5).astype(np.float32),
            "state_c": rng.standard_normal((2, rows, R)).astype(np.float32),
            "mean_feats": mean_feats,
            "att_values": values,
            "att_keys": keys,
            "att_masks": masks,
            "topk": np.array([1], np.int64),
        }
        a, b = fp32.run(["logprobs"], feeds)[0], int8.run(["logprobs"], feeds)[0]
        assert np.isfinite(b).all() and b.shape == a.shape
        np.testing.assert_allclose(np.exp(b).sum(axis=1), 1.0, atol=1e-4)  # still log-probabilities
        worst_max = max(worst_max, float(np.abs(a - b).max()))
        worst_mean = max(worst_mean, float(np.abs(a - b).mean()))
    assert worst_max <= STEP_MAX_TOLERANCE and worst_mean <= STEP_MEAN_TOLERANCE, (worst_max, worst_mean)
    assert worst_max > 0  # the int8 graph is not the fp32 one


def test_failed_int8_measurement_leaves_no_out_dir(checkpoint, tmp_path, monkeypatch):
    def non_finite(*args, **kwargs):
        raise ExportError("the int8 graphs give non-finite logprobs on the parity inputs")

    monkeypatch.setattr(quantize, "measure", non_finite)
    with pytest.raises(ExportError, match="non-finite"):
        export_checkpoint(checkpoint, tmp_path / "out", int8=True)
    assert list(tmp_path.iterdir()) == []


def test_measure_refuses_non_finite_int8_outputs(export_dir, tmp_path):
    # A decoder whose log-probs are NaN: the fp32 graph with a NaN added to its output.
    model = onnx.load(str(export_dir / "decoder.onnx"))
    for node in model.graph.node:
        node.output[:] = ["logprobs_finite" if o == "logprobs" else o for o in node.output]
    nan = onnx.helper.make_tensor("nan", onnx.TensorProto.FLOAT, [], [float("nan")])
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["nan_value"], value=nan))
    model.graph.node.append(onnx.helper.make_node("Add", ["logprobs_finite", "nan_value"], ["logprobs"]))
    onnx.save(model, str(tmp_path / "decoder.nan.onnx"))
    fp32 = {name: export_dir / f"{name}.onnx" for name in INT8}
    with pytest.raises(ExportError, match="non-finite .*logprobs"):
        quantize.measure(fp32, {**fp32, "decoder": tmp_path / "decoder.nan.onnx"}, F)


def _tiny_graph(weight_as_constant: bool) -> onnx.ModelProto:
    """y = x @ W: W behind Constant + Identity (as paddle2onnx writes weights), or a second graph input."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    inputs, nodes = [x], []
    if weight_as_constant:
        w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
        nodes += [
            h.make_node("Constant", [], ["w_const"], value=onnx.numpy_helper.from_array(w)),
            h.make_node("Identity", ["w_const"], ["w"]),
        ]
    else:
        inputs.append(h.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [16, 8]))
    nodes.append(h.make_node("MatMul", ["x", "w"], ["y"]))
    return h.make_model(h.make_graph(nodes, "g", inputs, [y]), opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_quantize_folds_constant_weights_and_fails_when_nothing_is_quantized(tmp_path):
    onnx.save(_tiny_graph(True), str(tmp_path / "const.onnx"))
    info = quantize.quantize_file(tmp_path / "const.onnx", tmp_path / "const.int8.onnx")
    assert info["quantized_nodes"] == {"MatMulInteger": 1} and info["weight_matmuls_found"] == 1
    onnx.save(_tiny_graph(False), str(tmp_path / "free.onnx"))
    with pytest.raises(ExportError, match="quantized no MatMul/Gemm"):
        quantize.quantize_file(tmp_path / "free.onnx", tmp_path / "free.int8.onnx")
    assert not (tmp_path / "free.int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["const.int8.onnx", "const.onnx", "free.onnx"]


# ---------------------------------------------------------------------------------------------- the runtime
def _int8_matmul_graph(w: np.ndarray) -> bytes:
    """y = x @ w as the --int8 graphs compute it: x quantized to uint8 at run time, w stored as int8, the int32
    product scaled back to float (onnxruntime fuses it into DynamicQuantizeMatMul)."""
    h, T = onnx.helper, onnx.TensorProto
    k, n = w.shape
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        h.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"]),
        h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT),
        h.make_node("Mul", ["xs", "ws"], ["s"]),
        h.make_node("Mul", ["yf", "s"], ["y"]),
    ]
    init = [
        onnx.numpy_helper.from_array(w.astype(np.int8), "w"),
        onnx.numpy_helper.from_array(np.array(0, np.int8), "wz"),
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ws"),
    ]
    graph = h.make_graph(
        nodes,
        "int8_matmul",
        [h.make_tensor_value_info("x", T.FLOAT, ["rows", k])],
        [h.make_tensor_value_info("y", T.FLOAT, ["rows", n])],
        init,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_runtime_int8_products_are_exact_where_u8_s8_would_saturate():
    """Large activations times large weights: x86 CPUs without VNNI add pairs of u8 x s8 products in 16 bits
    (255 * 127 * 2 = 64,770 > 32,767), so onnxruntime's default kernel saturates there. With the runtime's
    session options the int8 product equals the exact integer product (numpy, int64) on every CPU."""
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, (8, 64)).astype(np.float32)
    x[0, 0] = 255.0  # the largest value: the dynamic scale is exactly 1 and the uint8 codes are x itself
    w = rng.integers(100, 128, (64, 16))
    exact = (x.astype(np.int64) @ w).astype(np.float64) * 0.5
    options = session_options(threads=1)
    if not cpu_has_int8_dot():  # VNNI/AMX CPUs run the u8 x s8 kernels, which sum in 32 bits
        assert options.get_session_config_entry(INT8_PRECISION_OPTION[0]) == INT8_PRECISION_OPTION[1]
    got = _session(_int8_matmul_graph(w), options).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, exact, rtol=1e-6)  # float32 rounding of values up to ~1e6


@pytest.mark.parametrize("flags, weights", [("avx2 fma", "UINT8"), ("avx2 avx512_vnni", "INT8")])
def test_int8_session_entries_decide_which_kernel_runs(flags, weights, tmp_path):
    """onnxruntime shows the kernel it chose in its optimized graph: for the u8 x u8 kernel it rewrites the int8
    weights to uint8. With the entries the runtime picks for a CPU without an int8 dot product it must do so on
    x86-64 (where u8 x s8 saturates); with those for a VNNI CPU the weights stay int8 on every CPU, so that MLAS
    runs its u8 x s8 kernel, the VNNI or AMX one where the CPU has it."""
    w = np.random.default_rng(1).integers(-100, 128, (64, 16))
    options = session_options(threads=1, cpuinfo=f"processor\t: 0\nflags\t\t: {flags}\n")
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    _session(_int8_matmul_graph(w), options)
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    types = {onnx.TensorProto.DataType.Name(t.data_type)
             for t in onnx.load(options.optimized_model_filepath).graph.initializer if t.data_type in integer}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert types == ({weights} if weights == "INT8" or x86 else {"INT8"})


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse avx2 fma", False),  # AVX2 only (AMD Zen 2, Intel Haswell)
        ("avx2 avx512f avx512bw", False),  # AVX-512 without VNNI (Skylake-SP)
        ("avx2 avx512f avx512_vnni", True),
        ("avx2 avx_vnni", True),
    ],
)
def test_cpu_has_int8_dot(flags, expected):
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n"
    assert cpu_has_int8_dot(cpuinfo) is expected
    assert cpu_has_int8_dot("processor\t: 0\n") is None  # no flags line: unknown
    # the u8 x u8 precision option only where u8 x s8 would saturate: on VNNI/AMX CPUs it would take their int8
    # dot-product kernels away (onnxruntime applies it on every AVX2 CPU)
    options = session_options(threads=1, cpuinfo=cpuinfo)
    assert int8_session_entries(cpuinfo) == ({} if expected else dict([INT8_PRECISION_OPTION]))
    if not expected:
        assert options.get_session_config_entry(INT8_PRECISION_OPTION[0]) == INT8_PRECISION_OPTION[1]
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):  # the entry is absent
            options.get_session_config_entry(INT8_PRECISION_OPTION[0])
    assert int8_session_entries("processor\t: 0\n") == dict([INT8_PRECISION_OPTION])  # unknown: the safe one


def test_runtime_int8_notice_on_cpus_without_vnni(export_dir, monkeypatch, caplog):
    monkeypatch.setattr(sessions_mod, "_notified_int8", False)
    monkeypatch.setattr(sessions_mod, "cpu_has_int8_dot", lambda: False)
    with caplog.at_level("WARNING", logger="aoanet_runtime.sessions"):
        Captioner.from_dir(export_dir)  # fp32: no notice
        assert "VNNI" not in caplog.text
        Captioner.from_dir(export_dir, precision="int8")
        Captioner.from_dir(export_dir, precision="int8")
    assert caplog.text.count("no int8 dot-product instructions (VNNI)") == 1  # one line per process
    monkeypatch.setattr(sessions_mod, "_notified_int8", False)
    monkeypatch.setattr(sessions_mod, "cpu_has_int8_dot", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="aoanet_runtime.sessions"):
        Captioner.from_dir(export_dir, precision="int8")
    assert "VNNI" not in caplog.text


def test_runtime_int8_captions_mostly_agree_with_fp32(export_dir):
    fp32, int8 = Captioner.from_dir(export_dir), Captioner.from_dir(export_dir, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    equal, captions = [], []
    for seed in range(10):
        feats, masks = random_batch(seed)
        a, b = fp32.caption(feats, masks, beam_size=2), int8.caption(feats, masks, beam_size=2)
        assert np.isfinite(b.scores).all()
        equal += [x == y for x, y in zip(a.captions, b.captions, strict=True)]
        captions += b.captions
    assert len(set(captions)) > 10  # int8 captions are varied, not a degenerate constant
    assert np.mean(equal) >= MIN_CAPTIONS_EQUAL, np.mean(equal)


def _copy(export_dir: Path, dest: Path, names=("manifest.json", "encoder.onnx", "decoder.onnx", *INT8.values())):
    dest.mkdir()
    for name in names:
        shutil.copy(export_dir / name, dest / name)
    return dest


def test_runtime_int8_errors(export_dir, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of fp32, int8, got 'int4'"):
        Captioner.from_dir(export_dir, precision="int4")
    # An export made without --int8: its manifest lists only the fp32 graphs and has no int8 section.
    old = _copy(export_dir, tmp_path / "fp32_only", names=("manifest.json", "encoder.onnx", "decoder.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["int8"]
    for name in INT8.values():
        del manifest["files"][name]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Captioner.from_dir(old).precision == "fp32"  # still a complete export
    with pytest.raises(ExportDirError, match=r"has no int8 graphs .*aoanet-export --int8") as info:
        Captioner.from_dir(old, precision="int8")
    assert str(old) in str(info.value)
    # Listed but deleted.
    deleted = _copy(export_dir, tmp_path / "deleted")
    (deleted / INT8["decoder"]).unlink()
    with pytest.raises(ExportDirError, match=r"decoder\.int8\.onnx is missing \(listed in manifest\.json\)"):
        Captioner.from_dir(deleted, precision="int8")
    # Tampered: refused by the hash check, like the fp32 graphs.
    tampered = _copy(export_dir, tmp_path / "tampered")
    data = bytearray((tampered / INT8["encoder"]).read_bytes())
    data[-1] ^= 1
    (tampered / INT8["encoder"]).write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"encoder\.int8\.onnx does not match its sha256"):
        Captioner.from_dir(tampered, precision="int8")
    assert Captioner.from_dir(tampered).precision == "fp32"  # the fp32 graphs are untouched


def test_runtime_int8_works_where_paddle_cannot_be_imported(export_dir):
    code = f"""
import numpy as np
from aoanet_runtime import Captioner
c = Captioner.from_dir({str(export_dir)!r}, precision="int8")
r = c.caption([np.ones((k, {F}), np.float32) for k in (3, 1)], beam_size=2)
"""
    report = run_without_paddle(code)
    assert report["loaded"] == [] and len(report["captions"]) == 2


# ---------------------------------------------------------------------------------------------- the command
def test_infer_precision_int8_end_to_end(export_dir, checkpoint, features, tmp_path, capsys):
    results = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.json"
        code, stdout, err = run_cli(
            ["--model", str(export_dir), "--features", str(features), "--precision", precision, "--out", str(out)],
            capsys,
        )
        assert code == 0, err
        assert f"onnx {precision}, beam 3" in stdout and "images/s" in stdout
        results[precision] = json.loads(out.read_text())
    assert [r["image_id"] for r in results["int8"]] == [r["image_id"] for r in results["fp32"]] == list(range(12))
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results["int8"])

    out = tmp_path / "paddle.json"
    code, _, err = run_cli(
        [
            "--backend",
            "paddle",
            "--checkpoint",
            str(checkpoint),
            "--features",
            str(features),
            "--precision",
            "int8",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1 and "--precision int8 is for --backend onnx" in err and not out.exists()

    old = _copy(export_dir, tmp_path / "fp32_only", names=("manifest.json", "encoder.onnx", "decoder.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in INT8.values()}
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(
        ["--model", str(old), "--features", str(features), "--precision", "int8", "--out", str(out)], capsys
    )
    assert code == 1 and "has no int8 graphs" in err and "aoanet-export --int8" in err and not out.exists()
