"""Tolerances for values recorded on one CPU and recomputed on another.

Users and CI run on different x86-64 CPUs (Intel with AMX, AMD with AVX-512 and none, ...).
Their BLAS kernels and numpy's SIMD loops sum in different orders, so the last bits move;
what the algorithms decide (kept sets, orderings, counts) must not. Record decisions exactly
and floats with these tolerances.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Statistics of float32 forward passes (span MI, skip MI, angular, block influence, plan
# objectives). float32 rounds at 1.2e-7, and the Gaussian MI's log-determinants of nearly
# singular covariances amplify that: between an Intel Xeon (AMX) and an AMD EPYC (AVX-512)
# the recorded statistics differed by up to 3.3e-6 relative. 1e-4 leaves a 30x margin and
# is still 100x below a real change: one more calibration sample moves them by 2e-2 to 0.85
# (tests/test_scale.py checks that this tolerance catches it).
FLOAT32_STATS_RTOL = 1e-4

# float64 arithmetic on given matrices (the selectors on seeded random costs): only the
# summation order differs, a few ulps times the reduction length.
FLOAT64_RTOL = 1e-9


def split_floats(value: Any) -> tuple[Any, list[float]]:
    """``value`` (parsed JSON) with every float replaced by a marker, and the floats in order:
    the skeleton compares exactly, the floats with a tolerance."""
    floats: list[float] = []

    def walk(item):
        if isinstance(item, float):
            floats.append(item)
            return "<float>"
        if isinstance(item, dict):
            return {key: walk(item[key]) for key in sorted(item)}
        if isinstance(item, (list, tuple)):
            return [walk(entry) for entry in item]
        return item

    return walk(value), floats


def floats_close(got: list[float], expected: list[float], rtol: float) -> bool:
    """Same length, and each pair equal within ``rtol`` (NaN matches NaN, inf matches inf)."""
    if len(got) != len(expected):
        return False
    return all(
        (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
        for a, b in zip(got, expected)
    )


def assert_stats_close(got, expected, what: str) -> None:
    """Recorded statistics of float32 forward passes (NaN where undefined) within FLOAT32_STATS_RTOL."""
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(expected, dtype=float),
                               rtol=FLOAT32_STATS_RTOL, atol=0, equal_nan=True, err_msg=what)
