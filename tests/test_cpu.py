"""aoanet.cpu: the math-library and Paddle settings chosen per CPU, and that Paddle honours them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aoanet.cpu import MKL_CPU_TYPE, STRIDE_FLAG, configure_math_library, cpu_vendor

ROOT = Path(__file__).resolve().parents[1]
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"


def test_vendor_is_read_from_cpuinfo():
    assert cpu_vendor(AMD) == "AuthenticAMD"
    assert cpu_vendor(INTEL) == "GenuineIntel"
    assert cpu_vendor("processor\t: 0\n") is None


def test_mkl_override_on_amd_only_and_dense_views_everywhere():
    env: dict = {}
    assert configure_math_library(env, AMD) == {MKL_CPU_TYPE: "5", STRIDE_FLAG: "0"}
    assert env == {MKL_CPU_TYPE: "5", STRIDE_FLAG: "0"}
    env = {}
    assert configure_math_library(env, INTEL) == {STRIDE_FLAG: "0"}
    assert MKL_CPU_TYPE not in env


def test_the_users_choices_are_kept():
    env = {MKL_CPU_TYPE: "", STRIDE_FLAG: "1"}
    assert configure_math_library(env, AMD) == {}
    assert env == {MKL_CPU_TYPE: "", STRIDE_FLAG: "1"}


@pytest.mark.parametrize("given, dense", [(None, True), ("1", False)])
def test_paddle_reads_the_stride_flag_at_import(given, dense):
    """In a fresh process: after configure_math_library, Paddle's transposes are dense unless the user asked for
    strided views."""
    env = {k: v for k, v in os.environ.items() if k != STRIDE_FLAG}
    if given is not None:
        env[STRIDE_FLAG] = given
    code = ("from aoanet.cpu import configure_math_library; configure_math_library(); import paddle; "
            "print(paddle.randn([3, 4]).t().is_contiguous())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(dense)
