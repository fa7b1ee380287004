"""Span costs for Fast-Block-Select from the cached MI scores (provisional formula).

cost[i, j] = 1 - I(h_i; h_j) / max I, made monotone under the DPI. The research issue
replaces this with the formulation that the measurements support.
"""

from __future__ import annotations

import numpy as np

from vllm_miprun.scoring import from_nested_list


def span_cost_matrix(cache) -> np.ndarray:
    span = from_nested_list(cache.span_scores)
    cost = 1.0 - span / np.nanmax(span)
    return monotone_closure(cost)


def monotone_closure(cost: np.ndarray) -> np.ndarray:
    """Smallest matrix >= cost with cost[i, j] >= cost[i, j-1] and cost[i+1, j] (the DPI)."""
    out = cost.copy()
    size = out.shape[0]
    for length in range(2, size):
        for i in range(size - length):
            j = i + length
            out[i, j] = max(out[i, j], out[i, j - 1], out[i + 1, j])
    return out
