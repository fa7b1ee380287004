"""Span costs for Fast-Block-Select, from the cached scores (MI-PRUN's objective).

Formula (default, chosen by held-out perplexity on SmolLM2-135M; see
``benchmarks/results/mi_research.md``)::

    I_skip(h_i; h_j) = (d/2) * log( tr Cov(g_j) / E||g_j - g_i||^2 ),  g = h / rms(h)
    cost[i, j]       = ( exp(-2 * I_skip(h_i; h_j) / d) ) ** POWER        (POWER = 2)
                     = ( E||g_j - g_i||^2 / tr Cov(g_j) ) ** 2

then made monotone under the DPI (:func:`monotone_closure`). ``I_skip`` is the
isotropic skip-channel MI (:func:`vllm_miprun.core.scoring.isotropic_skip_mi_matrix`): the
information about the state that block ``j`` expects which survives when the run
``[i, j)`` is replaced by the identity -- which is exactly what pruning does.
``exp(-2 I_skip / d)`` is the per-dimension fraction of the skip channel that is noise
(0 = the run is the identity, 1 = nothing of ``g_j`` is left). Fast-Block-Select
minimises ``J(P) = sum over maximal pruned runs [i, j) of cost[i, j]``.

Why this and not the plain span MI
    The plain Gaussian ``I(h_i; h_j)`` is invariant under invertible maps, so an
    essential but invertible run looks redundant; ranking by it drops blocks 2-10 of
    SmolLM2 and multiplies perplexity by 100 (METHOD.md). The skip-channel MI is not
    invariant: it measures what the identity path keeps.

Why the power 2
    With POWER = 1 the run cost grows sub-additively with the run's length (a long run
    costs about as much as its worst block), so the DP prefers one long contiguous run,
    the angular-distance failure mode (drop 8: ppl 317 vs ShortGPT's 92). Squaring
    makes the cost of a run super-additive in its length, which is what the measured
    damage does, and the DP then spreads the pruned blocks over short runs.

Estimators
    The skip-channel MI is a Gaussian quantity, so it is the cost of a ``gaussian``
    cache (the default). A cache calibrated with ``estimator="renyi"`` is priced by its
    own plain span MI, ``(1 - I/I_max) ** POWER`` with the matrix Rényi ``I``; that is the
    weaker objective (see the quality table), kept so the estimators can be compared
    through the same pipeline. Gaussian caches without ``baselines["skip_mi_iso"]``
    fall back to it too.

The refinement that reaches SLEB-level quality (``vllm_miprun.pipeline.refine``) uses this
matrix only to rank which blocks to try.
"""

from __future__ import annotations

import numpy as np

from vllm_miprun.core.matrices import from_nested_list
from vllm_miprun.errors import CacheError

POWER = 2.0
SKIP_KEY = "skip_mi_iso"


def span_cost_matrix(cache, power: float = POWER) -> np.ndarray:
    """(L+1)x(L+1) cost for :func:`vllm_miprun.core.selection.fast_block_select`; NaN for ``i >= j``.

    Pure function of a :class:`~vllm_miprun.pipeline.store.ScoreCache` (see the module docstring).
    """
    extra = (cache.baselines or {}).get(SKIP_KEY)
    if extra is not None and _estimator_name(cache) == "gaussian":
        skip = from_nested_list(extra)
        dim = (cache.model or {}).get("hidden_size") or _dim_from(cache)
        return skip_cost(skip, dim, power)
    span = from_nested_list(cache.span_scores)
    return mi_fallback_cost(span, power)


def skip_cost(skip_mi: np.ndarray, dim: int, power: float = POWER) -> np.ndarray:
    """``exp(-2 I_skip / d) ** power``, closed under the DPI."""
    noise_fraction = np.exp(-2.0 * np.asarray(skip_mi, dtype=float) / float(dim))
    return monotone_closure(upper_triangle(noise_fraction ** power))


def mi_fallback_cost(span_mi: np.ndarray, power: float = POWER) -> np.ndarray:
    """``(1 - I/I_max) ** power`` from the plain span MI, closed under the DPI."""
    span_mi = np.asarray(span_mi, dtype=float)
    cost = np.clip(1.0 - span_mi / np.nanmax(span_mi), 0.0, None)
    return monotone_closure(upper_triangle(cost ** power))


def _estimator_name(cache) -> str:
    estimator = cache.estimator or {}
    return estimator.get("name", "gaussian") if isinstance(estimator, dict) else str(estimator)


def _dim_from(cache) -> int:
    raise CacheError("the score cache has no model.hidden_size; recalibrate with "
                     "`vllm-miprun calibrate MODEL_DIR --force`")


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` above the diagonal, NaN on and below it (the span-cost layout)."""
    out = np.full(matrix.shape, np.nan)
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    out[rows, cols] = matrix[rows, cols]
    return out


def monotone_closure(cost: np.ndarray) -> np.ndarray:
    """Smallest matrix >= cost with cost[i, j] >= cost[i, j-1] and cost[i+1, j] (the DPI)."""
    out = cost.copy()
    size = out.shape[0]
    for length in range(2, size):
        for i in range(size - length):
            j = i + length
            out[i, j] = max(out[i, j], out[i, j - 1], out[i + 1, j])
    return out
