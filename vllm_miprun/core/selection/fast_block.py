"""MI-PRUN's Fast-Block-Select: the paper's iterative search over candidate runs, plus a
DPI lower-bound certificate that makes its answer the exact optimum of ``J`` whenever
the cost matrix obeys the DPI, while reading far fewer run costs than the exact DP."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from vllm_miprun.core.selection.objective import check_cost, maximal_runs, tolerance
from vllm_miprun.core.selection.result import Selection, check_prune_request, make_selection
from vllm_miprun.core.selection.runs import admissible_mask, solve_runs


class _CostReader:
    """Reads ``cost[i, j]`` and remembers which distinct entries were read."""

    def __init__(self, cost: np.ndarray):
        self.cost = cost
        self.read: set[tuple[int, int]] = set()

    def __call__(self, i: int, j: int) -> float:
        self.read.add((i, j))
        return float(self.cost[i, j])

    @property
    def count(self) -> int:
        return len(self.read)


class _RunBook:
    """What Fast-Block-Select knows about run costs: read values and DPI lower bounds.

    ``lower[i, j]`` is the largest read cost of any sub-run of ``[i, j)``; by the DPI it
    never exceeds ``cost[i, j]``. Reading ``[a, b)`` raises the bound of every run that
    contains it, i.e. the block ``lower[:a+1, b:]``.
    """

    def __init__(self, cost: np.ndarray, admissible: np.ndarray):
        self.reader = _CostReader(cost)
        n = cost.shape[0]
        self.admissible = admissible
        self.known = np.full((n, n), math.inf)
        self.lower = np.full((n, n), -math.inf)

    def read(self, i: int, j: int) -> float:
        if (i, j) not in self.reader.read:
            value = self.reader(i, j)
            self.known[i, j] = value
            np.maximum(self.lower[: i + 1, j:], value, out=self.lower[: i + 1, j:])
        return float(self.known[i, j])

    def is_read(self, i: int, j: int) -> bool:
        return (i, j) in self.reader.read

    def read_only_costs(self) -> np.ndarray:
        """Run costs where unread runs are forbidden (the paper's combination step)."""
        return np.where(self.admissible, self.known, math.inf)

    def optimistic_costs(self) -> np.ndarray:
        """Read costs where known, DPI lower bounds elsewhere (for the certificate)."""
        est = np.where(np.isfinite(self.known), self.known, self.lower)
        return np.where(self.admissible, est, math.inf)


def _candidate_runs(candidates, free, num_prune, max_alternatives):
    """Contiguous runs of 2..num_prune free blocks with at most ``max_alternatives`` blocks
    from outside the candidate pool; runs must start and end on candidates, so an
    alternative only ever bridges a gap between candidates."""
    runs = []
    num_blocks = max(free) + 1 if free else 0
    for i in sorted(candidates):
        alternatives = 0
        for j in range(i + 1, min(num_blocks, i + num_prune) + 1):
            b = j - 1
            if b not in free:
                break
            if b not in candidates:
                alternatives += 1
                if alternatives > max_alternatives:
                    break
                continue
            if j - i >= 2:
                runs.append((i, j))
    return runs


def fast_block_select(
    cost,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    margin: int | None = None,
    top_runs: int = 2,
    max_alternatives: int = 1,
    max_rounds: int = 50,
    certify: bool = True,
) -> Selection:
    """MI-PRUN Fast-Block-Select for the objective ``J`` (see :mod:`.objective`).

    Phase 1 -- the paper's iterative search:

    1. Read every single-block cost ``cost[b, b+1]`` and sort the unprotected blocks by it
       (ties by index). The ``num_prune + margin`` cheapest form the candidate pool, the
       rest the alternatives (``margin`` defaults to ``max(2, num_prune // 2)``).
    2. Candidate runs: contiguous runs of 2..k unprotected blocks that start and end on
       candidates and contain at most ``max_alternatives`` alternatives (bridges).
    3. Rank the unread candidate runs of each length by their summed single-block costs
       and read the real span cost only for the ``top_runs`` cheapest per length. A run
       is skipped unread when its DPI lower bound (largest read sub-run cost, which
       includes each single inside) already reaches the incumbent objective, since all
       costs are then non-negative and any set containing it cannot win.
    4. Combine: the exact run DP over the read runs picks the non-overlapping runs that
       remove exactly k blocks. Adjacent runs merge into one maximal run scored by its own
       span cost, so a combination is only allowed if its merged runs were read; this is
       how conflicting (overlapping or touching) runs are resolved -- never by summing.
    5. Update the pools: each chosen run's neighbours ``i-1`` and ``j`` join the candidate
       pool, as do the next ``margin`` cheapest alternatives. Repeat until the chosen set
       stops changing (or ``max_rounds``).

    Phase 2 -- DPI certificate (this project's addition, ``certify=True``): solve the
    same DP with every unread run scored by its DPI lower bound. That value bounds the
    true optimum from below. If it is within tolerance of the incumbent, the incumbent is
    optimal; otherwise read the unread runs of the bound's solution and repeat. Each
    round reads at least one new entry, so it terminates, and on a cost matrix that obeys
    the DPI the result is the exact optimum. (The paper shows "global" only by
    convergence; this makes it a proof, at the price of extra reads.) If the cache breaks
    the DPI, the bounds are heuristic; see :func:`dpi_violations`.

    Deterministic: every ordering breaks ties by block index, and the DP breaks ties
    towards the lexicographically smallest pruned tuple. ``run_evaluations`` counts the
    distinct cost entries read in both phases; ``details`` splits them by phase.
    """
    cost = check_cost(cost)
    num_blocks = cost.shape[0] - 1
    protect = check_prune_request(num_blocks, num_prune, protect)
    k = num_prune
    if k == 0:
        return make_selection("mi-prun", num_blocks, (), cost, iterations=0)
    free = frozenset(range(num_blocks)) - protect
    book = _RunBook(cost, admissible_mask(num_blocks, k, protect))
    single = {b: book.read(b, b + 1) for b in sorted(free)}
    order = sorted(free, key=lambda b: (single[b], b))
    margin = max(2, k // 2) if margin is None else int(margin)
    non_negative = min(single.values()) >= 0.0

    pool_size = min(len(order), k + margin)
    candidates = set(order[:pool_size])
    incumbent_value, incumbent = math.inf, ()
    previous, rounds = None, 0
    for rounds in range(1, max_rounds + 1):
        runs = _candidate_runs(candidates, free, k, max_alternatives)
        _read_top_runs(book, runs, single, top_runs, incumbent_value if non_negative else math.inf)
        value, pruned = solve_runs(book.read_only_costs(), k)
        if value < incumbent_value - tolerance(value):
            incumbent_value, incumbent = value, pruned
        if pruned == previous:
            break
        previous = pruned
        _grow_pool(candidates, pruned, free, order, margin)
    phase1_reads = book.reader.count

    certified = False
    # Without a feasible read-only combination, the certificate phase must find one.
    if certify or not math.isfinite(incumbent_value):
        incumbent_value, incumbent, certified = _certify(book, k, incumbent_value, incumbent)
    return make_selection(
        "mi-prun",
        num_blocks,
        incumbent,
        cost,
        run_evaluations=book.reader.count,
        iterations=rounds,
        details={
            "phase1_evaluations": phase1_reads,
            "certified_optimal": certified,
        },
    )


def _read_top_runs(book, runs, single, top_runs, incumbent_value):
    """Read the ``top_runs`` cheapest unread runs per length, ranked by summed singles."""
    by_length: dict[int, list] = {}
    for i, j in runs:
        if book.is_read(i, j):
            continue
        if book.lower[i, j] >= incumbent_value:
            continue  # DPI: cannot be part of a set better than the incumbent
        by_length.setdefault(j - i, []).append((sum(single[b] for b in range(i, j)), i, j))
    for length in sorted(by_length):
        for _, i, j in sorted(by_length[length])[:top_runs]:
            book.read(i, j)


def _grow_pool(candidates, pruned, free, order, margin) -> bool:
    """Add the chosen runs' neighbours and the next ``margin`` cheapest blocks to the pool."""
    before = len(candidates)
    for i, j in maximal_runs(pruned):
        for b in (i - 1, j):
            if b in free:
                candidates.add(b)
    added = 0
    for b in order:
        if added >= margin:
            break
        if b not in candidates:
            candidates.add(b)
            added += 1
    return len(candidates) > before


def _certify(book, k, incumbent_value, incumbent):
    """Phase 2: tighten DPI lower bounds until they prove the incumbent optimal."""
    while True:
        bound, relaxed = solve_runs(book.optimistic_costs(), k)
        if bound >= incumbent_value - tolerance(incumbent_value):
            return incumbent_value, incumbent, True
        for i, j in maximal_runs(relaxed):
            book.read(i, j)
        value = sum(book.known[i, j] for i, j in maximal_runs(relaxed))
        if value < incumbent_value - tolerance(value):
            incumbent_value, incumbent = float(value), relaxed
