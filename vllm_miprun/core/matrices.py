"""Span matrices in JSON form (the score cache's): floats above the diagonal, ``None`` elsewhere.

Kept apart from the estimators so that reading a cache needs numpy only, never torch.
"""

from __future__ import annotations

import numpy as np


def to_nested_list(matrix: np.ndarray) -> list[list[float | None]]:
    """JSON form: floats above the diagonal, ``None`` elsewhere."""
    size = matrix.shape[0]
    return [[float(matrix[i, j]) if i < j else None for j in range(size)] for i in range(size)]


def from_nested_list(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)
