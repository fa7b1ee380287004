"""The objective ``J(P)`` that MI-PRUN minimises, and checks on the span-cost matrix.

``cost`` is an ``(L+1) x (L+1)`` float array: ``cost[i, j]`` (``i < j``) estimates the
information lost by skipping the run of blocks ``[i, j)``; NaN where ``i >= j``. For a
pruned set ``P``::

    J(P) = sum of cost[i, j] over the MAXIMAL contiguous runs [i, j) of P

Adjacent pruned blocks form one run and are scored once, as that run (see the package
docstring for why). The DPI makes ``cost`` monotone:
``cost[i, j] >= max(cost[i, k], cost[k, j])`` for ``i < k < j``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

# Two objectives closer than this (relative to their size) count as a tie.
REL_TOL = 1e-9


def tolerance(value: float) -> float:
    """The tie tolerance around an objective ``value``."""
    return REL_TOL * max(1.0, abs(value))



def maximal_runs(pruned: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Split a set of block indices into maximal contiguous half-open runs."""
    runs: list[tuple[int, int]] = []
    for b in sorted(set(int(x) for x in pruned)):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return tuple(runs)


def objective_value(cost: np.ndarray, pruned: Iterable[int]) -> float:
    """``J(P)``: the sum of ``cost[i, j]`` over the maximal runs of ``P`` (0 for no pruning)."""
    cost = np.asarray(cost, dtype=float)
    return float(sum(cost[i, j] for i, j in maximal_runs(pruned)))


def check_cost(cost) -> np.ndarray:
    """``cost`` as a float array, after checking its shape and its finite upper triangle."""
    cost = np.asarray(cost, dtype=float)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        raise ValueError(
            f"cost must be a square (L+1)x(L+1) matrix with L >= 1, got shape {cost.shape}; "
            "pass the span-cost matrix from the calibration cache"
        )
    upper = cost[np.triu_indices(cost.shape[0], k=1)]
    if not np.all(np.isfinite(upper)):
        raise ValueError(
            "cost[i, j] must be finite for every i < j, got NaN or inf in the upper triangle; "
            "recalibrate or repair the cache"
        )
    return cost


def dpi_violations(cost: np.ndarray, tol: float = 1e-9) -> int:
    """Count entries breaking ``cost[i, j] >= max(cost[i, j-1], cost[i+1, j])``.

    Checking the two one-shorter sub-runs suffices: by induction they cover every sub-run.
    Fast-Block-Select's optimality certificate assumes zero violations.
    """
    cost = check_cost(cost)
    n = cost.shape[0]
    bad = 0
    for i in range(n):
        for j in range(i + 2, n):
            if cost[i, j] + tol < max(cost[i, j - 1], cost[i + 1, j]):
                bad += 1
    return bad
