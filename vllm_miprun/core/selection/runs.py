"""The exact solver: dynamic programming over maximal pruned runs.

:func:`solve_runs` minimises the sum of run costs over the maximal runs of a
``k``-block set; :func:`exact_select` runs it on every admissible run (``O(L^2 k)``).
Fast-Block-Select (:mod:`.fast_block_select`) calls the same DP on the runs it has read.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from vllm_miprun.core.selection.objective import check_cost, tolerance
from vllm_miprun.core.selection.result import Selection, check_prune_request, make_selection


def solve_runs(run_cost: np.ndarray, num_prune: int) -> tuple[float, tuple[int, ...]]:
    """Minimise the sum of ``run_cost`` over maximal runs of a ``num_prune``-block set.

    ``run_cost[i, j]`` is the score of pruning exactly the maximal run ``[i, j)``; ``inf``
    forbids a run (protected block inside, unread, too long). Suffix DP:
    ``g[p, m]`` = best score for blocks ``p..L-1`` pruning ``m`` of them, given that block
    ``p-1`` is kept (so a run may start at ``p``). A run ``[p, q)`` with ``q < L`` forces
    block ``q`` kept, which is what makes runs maximal. Ties: the lexicographically
    smallest sorted pruned tuple among objectives within ``REL_TOL`` of the optimum
    (i.e. prefer pruning earlier blocks), found by a greedy forward reconstruction.
    Returns ``(inf, ())`` when no feasible set exists.
    """
    num_blocks = run_cost.shape[0] - 1
    k = num_prune
    inf = math.inf
    # g has two sentinel rows: L (no blocks left) and L+1 (ended by a run reaching L), so
    # a run [p, q) always continues at row q + 1. ``skew[q, q + m] = g[q, m]`` lines up
    # ``g[p + n + 1, m - n]`` for every run length n in one column, so each position
    # is a single vectorised minimum.
    g = np.full((num_blocks + 2, k + 1), inf)
    skew = np.full((num_blocks + 2, num_blocks + k + 3), inf)
    for q in (num_blocks, num_blocks + 1):
        g[q, 0] = 0.0
        skew[q, q] = 0.0
    for p in range(num_blocks - 1, -1, -1):
        best = g[p + 1].copy()  # keep block p
        longest = min(k, num_blocks - p)
        if longest > 0:
            starts = run_cost[p, p + 1 : p + 1 + longest]
            options = starts[:, None] + skew[p + 2 : p + 2 + longest, p + 1 : p + 2 + k]
            np.minimum(best, options.min(axis=0), out=best)
        g[p] = best
        skew[p, p : p + k + 1] = best
    optimum = float(g[0, k])
    if not optimum < inf:
        return inf, ()
    # Forward reconstruction: at each position prefer the longest run starting there
    # (prunes the earliest blocks), then keeping the block.
    limit = optimum + tolerance(optimum)
    pruned: list[int] = []
    p, m, acc = 0, k, 0.0
    while p < num_blocks and m > 0:
        chosen = None
        for n in range(min(m, num_blocks - p), 0, -1):
            c = run_cost[p, p + n]
            if not c < inf:
                continue
            nxt = p + n + 1 if p + n < num_blocks else num_blocks + 1
            if acc + c + g[nxt, m - n] <= limit:
                chosen = (n, c, nxt)
                break
        if chosen is None:
            p += 1  # keeping p is optimal
            continue
        n, c, nxt = chosen
        pruned.extend(range(p, p + n))
        acc += c
        m -= n
        p = nxt
    return optimum, tuple(pruned)


def admissible_mask(num_blocks: int, num_prune: int, protect: frozenset[int]) -> np.ndarray:
    """Boolean mask of runs ``[i, j)`` a selection may use: short enough, nothing protected."""
    mask = np.zeros((num_blocks + 1, num_blocks + 1), dtype=bool)
    for i in range(num_blocks):
        for j in range(i + 1, min(num_blocks, i + num_prune) + 1):
            if j - 1 in protect:
                break
            if i in protect:
                break
            mask[i, j] = True
    return mask


def exact_select(cost, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """Exact minimiser of ``J(P)`` with ``|P| = num_prune`` and ``P`` disjoint from ``protect``.

    Dynamic programming over positions, ``O(L^2 k)``; it reads every admissible run
    cost (length <= k, no protected block inside). Ties within a relative 1e-9 go to the
    lexicographically smallest sorted pruned tuple.
    """
    cost = check_cost(cost)
    num_blocks = cost.shape[0] - 1
    protect = check_prune_request(num_blocks, num_prune, protect)
    mask = admissible_mask(num_blocks, num_prune, protect)
    run_cost = np.where(mask, np.nan_to_num(cost, nan=math.inf), math.inf)
    optimum, pruned = solve_runs(run_cost, num_prune)
    return make_selection(
        "exact", num_blocks, pruned, cost, run_evaluations=int(mask.sum()), iterations=1
    )


