"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from aoanet.cpu import configure_allocator, configure_math_library

configure_math_library()  # before any test imports Paddle, as the commands do
configure_allocator()

from aoanet.cli.data import app as data_app  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny embedded dataset (64 images), prepared with the real commands: synth -> prepro -> ngrams."""
    d = tmp_path_factory.mktemp("synth")
    runner = CliRunner()
    for args in (
        ["synth", "--out", str(d), "--images", "64", "--seed", "5"],
        ["prepro", "--input-json", str(d / "dataset_coco.json"), "--output-json", str(d / "cocotalk.json"),
         "--output-h5", str(d / "cocotalk_label.h5")],
        ["ngrams", "--input-json", str(d / "dataset_coco.json"), "--dict-json", str(d / "cocotalk.json"),
         "--out", str(d / "ngrams.json.gz")],
    ):
        res = runner.invoke(data_app, args)
        assert res.exit_code == 0, res.output
    return d
