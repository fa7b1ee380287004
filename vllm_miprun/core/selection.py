"""Choose which decoder blocks to prune: MI-PRUN's Fast-Block-Select, an exact solver, baselines.

Conventions (fixed by the calibration code)
-------------------------------------------
A model has ``L`` blocks ``0..L-1`` and ``L+1`` boundary hidden states ``h_0..h_L``;
block ``b`` maps ``h_b -> h_{b+1}``. Pruning the contiguous run of blocks ``[i, j)``
(``i < j``) feeds ``h_i`` where ``h_j`` used to be.

``cost`` is an ``(L+1) x (L+1)`` float array: ``cost[i, j]`` (``i < j``) estimates the
information lost by skipping the run ``[i, j)``; lower is safer to prune, NaN where
``i >= j``. It comes from mutual information through the data-processing inequality
(DPI), so it is monotone: ``cost[i, j] >= max(cost[i, k], cost[k, j])`` for ``i < k < j``.

The objective
-------------
Given a number of blocks to prune ``k = L - K``, choose a pruned set ``P`` with
``|P| = k`` that contains no protected block and minimises::

    J(P) = sum of cost[i, j] over the MAXIMAL contiguous runs [i, j) of P

Adjacent pruned blocks form one run and are scored once, as that run: skipping
``[2, 4)`` costs ``cost[2, 4]``, not ``cost[2, 3] + cost[3, 4]``, because the model then
feeds ``h_2`` straight into block 4, and the DPI says nothing about the span being the
sum of its parts. A lower ``J`` is a better choice.

Solvers
-------
``exact_select`` finds the optimum by dynamic programming over positions
(``O(L^2 k)`` time, reads every admissible run cost). ``fast_block_select`` is the
paper's iterative Fast-Block-Select plus a DPI lower-bound certificate; it reads far
fewer run costs and returns the exact optimum whenever the cost matrix obeys the DPI
(see its docstring). Baselines (ShortGPT, angular distance, SLEB, last blocks, random)
return the same :class:`Selection` type; :func:`select` dispatches by method name.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("mi-prun", "shortgpt", "angular", "sleb", "last", "random")
DEFAULT_METHOD = "mi-prun"

# Two objectives closer than this (relative to their size) count as a tie.
_REL_TOL = 1e-9


# --------------------------------------------------------------------------- result type


@dataclass(frozen=True)
class Selection:
    """The blocks a selector keeps and prunes, with how it got there.

    ``objective`` is ``J(pruned)`` on the cost matrix when one was given, else None.
    ``run_evaluations`` counts the distinct ``cost[i, j]`` entries the selector read
    (for SLEB it counts ``evaluate`` calls instead, see ``details``).
    """

    method: str
    num_blocks: int
    kept: tuple[int, ...]
    pruned: tuple[int, ...]
    objective: float | None = None
    run_evaluations: int = 0
    iterations: int = 0
    details: dict = field(default_factory=dict, compare=False)

    @property
    def keep_ratio(self) -> float:
        return len(self.kept) / self.num_blocks

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """Maximal contiguous pruned runs as half-open ``(start, stop)`` pairs."""
        return maximal_runs(self.pruned)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "num_blocks": self.num_blocks,
            "kept": list(self.kept),
            "pruned": list(self.pruned),
            "keep_ratio": self.keep_ratio,
            "objective": self.objective,
            "runs": [list(r) for r in self.runs],
            "run_evaluations": self.run_evaluations,
            "iterations": self.iterations,
            **{k: v for k, v in self.details.items() if k not in ("kept", "pruned")},
        }


def _make_selection(method, num_blocks, pruned, cost=None, **extra) -> Selection:
    pruned = tuple(sorted(int(b) for b in pruned))
    kept = tuple(b for b in range(num_blocks) if b not in set(pruned))
    objective = None if cost is None else objective_value(cost, pruned)
    details = extra.pop("details", {})
    return Selection(method, num_blocks, kept, pruned, objective, details=details, **extra)


# --------------------------------------------------------------------------- counts


def _check_number(value, what: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}; {hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}; {hint}")
    return value


def keep_count(ratio: float, num_blocks: int) -> int:
    """Number of blocks kept for a keep ratio.

    Rule: ``K = max(1, floor(ratio * L + 0.5))`` -- round to nearest, ties up, and at
    least one block is always kept. E.g. L=30: 0.9 -> 27, 0.75 -> 23 (22.5 rounds up),
    0.5 -> 15, 0.01 -> 1. A tiny epsilon absorbs float noise such as 0.7 * 30 = 20.999...
    """
    hint = "pass e.g. --miprun-keep 0.75"
    ratio = _check_number(ratio, "keep ratio", hint)
    _check_num_blocks(num_blocks)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}; {hint}")
    return max(1, min(num_blocks, math.floor(ratio * num_blocks + 0.5 + 1e-9)))


def prune_count(ratio: float, num_blocks: int) -> int:
    """Number of blocks pruned for a keep ratio: ``L - keep_count(ratio, L)``."""
    return num_blocks - keep_count(ratio, num_blocks)


def _check_num_blocks(num_blocks) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral) or num_blocks < 1:
        raise ValueError(f"number of blocks must be a positive integer, got {num_blocks!r}")
    return int(num_blocks)


# --------------------------------------------------------------------------- objective


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


def _check_cost(cost) -> np.ndarray:
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
    cost = _check_cost(cost)
    n = cost.shape[0]
    bad = 0
    for i in range(n):
        for j in range(i + 2, n):
            if cost[i, j] + tol < max(cost[i, j - 1], cost[i + 1, j]):
                bad += 1
    return bad


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


# --------------------------------------------------------------------------- run DP


def _tolerance(value: float) -> float:
    return _REL_TOL * max(1.0, abs(value))


def _solve_runs(run_cost: np.ndarray, num_prune: int) -> tuple[float, tuple[int, ...]]:
    """Minimise the sum of ``run_cost`` over maximal runs of a ``num_prune``-block set.

    ``run_cost[i, j]`` is the score of pruning exactly the maximal run ``[i, j)``; ``inf``
    forbids a run (protected block inside, unread, too long). Suffix DP:
    ``g[p, m]`` = best score for blocks ``p..L-1`` pruning ``m`` of them, given that block
    ``p-1`` is kept (so a run may start at ``p``). A run ``[p, q)`` with ``q < L`` forces
    block ``q`` kept, which is what makes runs maximal. Ties: the lexicographically
    smallest sorted pruned tuple among objectives within ``_REL_TOL`` of the optimum
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
    limit = optimum + _tolerance(optimum)
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


def _admissible_mask(num_blocks: int, num_prune: int, protect: frozenset[int]) -> np.ndarray:
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


# --------------------------------------------------------------------------- exact


def exact_select(cost, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """Exact minimiser of ``J(P)`` with ``|P| = num_prune`` and ``P`` disjoint from ``protect``.

    Dynamic programming over positions, ``O(L^2 k)``; it reads every admissible run
    cost (length <= k, no protected block inside). Ties within a relative 1e-9 go to the
    lexicographically smallest sorted pruned tuple.
    """
    cost = _check_cost(cost)
    num_blocks = cost.shape[0] - 1
    protect = _check_prune_request(num_blocks, num_prune, protect)
    mask = _admissible_mask(num_blocks, num_prune, protect)
    run_cost = np.where(mask, np.nan_to_num(cost, nan=math.inf), math.inf)
    optimum, pruned = _solve_runs(run_cost, num_prune)
    return _make_selection(
        "exact", num_blocks, pruned, cost, run_evaluations=int(mask.sum()), iterations=1
    )


# --------------------------------------------------------------------------- validation


def parse_protect(spec, num_blocks: int) -> frozenset[int]:
    """Blocks that must be kept, from ``"first"``, ``"last"``, ``"first,last"``, ``"0,29"``,
    an int, or a list of those. ``None`` or ``""`` protects nothing (the default: the
    scores decide whether the first and last blocks may go)."""
    num_blocks = _check_num_blocks(num_blocks)
    if spec is None:
        return frozenset()
    if isinstance(spec, str):
        items: list = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        items = [spec]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = list(spec)
    else:
        raise ValueError(
            f"protect must be a string like 'first,last' or '0,29', or a list of block indices, "
            f"got {spec!r}"
        )
    out: set[int] = set()
    for item in items:
        out.add(_parse_protect_item(item, num_blocks))
    return frozenset(out)


def _parse_protect_item(item, num_blocks: int) -> int:
    hint = f"use 'first', 'last' or an index in 0..{num_blocks - 1}, e.g. --protect first,last"
    if isinstance(item, str):
        word = item.strip().lower()
        if word == "first":
            return 0
        if word == "last":
            return num_blocks - 1
        try:
            item = int(word)
        except ValueError:
            raise ValueError(f"cannot read protected block {item!r}; {hint}") from None
    if isinstance(item, bool) or not isinstance(item, numbers.Integral):
        raise ValueError(f"protected block must be an integer index, got {item!r}; {hint}")
    if not 0 <= item < num_blocks:
        raise ValueError(f"protected block {item} is out of range for {num_blocks} blocks; {hint}")
    return int(item)


def _check_prune_request(num_blocks: int, num_prune, protect) -> frozenset[int]:
    """Validate ``num_prune`` and ``protect``; return ``protect`` as a frozenset."""
    num_blocks = _check_num_blocks(num_blocks)
    if isinstance(num_prune, bool) or not isinstance(num_prune, numbers.Integral):
        raise ValueError(f"number of blocks to prune must be an integer, got {num_prune!r}")
    if not 0 <= num_prune <= num_blocks - 1:
        raise ValueError(
            f"number of blocks to prune must be in 0..{num_blocks - 1} (at least one of "
            f"{num_blocks} blocks is kept), got {num_prune}; choose a larger keep ratio"
        )
    protect = frozenset(protect)
    for b in protect:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < num_blocks:
            raise ValueError(
                f"protected block {b!r} is out of range for {num_blocks} blocks; "
                f"use indices in 0..{num_blocks - 1}"
            )
    prunable = num_blocks - len(protect)
    if num_prune > prunable:
        raise ValueError(
            f"cannot prune {num_prune} of {num_blocks} blocks when {len(protect)} are protected "
            f"(only {prunable} prunable); protect fewer blocks or keep more"
        )
    return frozenset(int(b) for b in protect)


# --------------------------------------------------------------------------- Fast-Block-Select


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
    """MI-PRUN Fast-Block-Select for the objective ``J`` (see the module docstring).

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
    cost = _check_cost(cost)
    num_blocks = cost.shape[0] - 1
    protect = _check_prune_request(num_blocks, num_prune, protect)
    k = num_prune
    if k == 0:
        return _make_selection("mi-prun", num_blocks, (), cost, iterations=0)
    free = frozenset(range(num_blocks)) - protect
    book = _RunBook(cost, _admissible_mask(num_blocks, k, protect))
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
        value, pruned = _solve_runs(book.read_only_costs(), k)
        if value < incumbent_value - _tolerance(value):
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
    return _make_selection(
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
        bound, relaxed = _solve_runs(book.optimistic_costs(), k)
        if bound >= incumbent_value - _tolerance(incumbent_value):
            return incumbent_value, incumbent, True
        for i, j in maximal_runs(relaxed):
            book.read(i, j)
        value = sum(book.known[i, j] for i, j in maximal_runs(relaxed))
        if value < incumbent_value - _tolerance(value):
            incumbent_value, incumbent = float(value), relaxed


# --------------------------------------------------------------------------- test instances

INSTANCE_KINDS = ("channels", "mixed", "planted")


def random_dpi_cost(num_blocks: int, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A random span-cost matrix that obeys the DPI and is not additive.

    Kinds (``None`` picks one at random):

    - ``"channels"``: a Markov chain carrying several independent channels; block ``b``
      erodes channel ``c`` at rate ``r[b, c]`` and a run loses
      ``sum_c w_c * (1 - exp(-sum_b r[b, c]))`` -- saturating, so runs of blocks that
      erode the same channel are sub-additive (cheap together, dear alone).
    - ``"mixed"``: log-normal block costs; a run costs ``(sum)^gamma`` times log-normal
      noise with a per-instance ``gamma`` in [0.75, 1.25] (sub- or super-additive).
    - ``"planted"``: ``"mixed"`` plus a middle run of 2..L/3 blocks whose singles look
      expensive but which is cheap as a whole.

    Every kind ends with a monotone closure (running maxima over the two one-shorter
    sub-runs), so ``cost[i, j] >= max(cost[i, k], cost[k, j])`` holds exactly.
    """
    num_blocks = _check_num_blocks(num_blocks)
    if kind is None:
        kind = INSTANCE_KINDS[int(rng.integers(len(INSTANCE_KINDS)))]
    if kind == "channels":
        raw = _channel_costs(num_blocks, rng)
    elif kind == "mixed":
        raw = _mixed_costs(num_blocks, rng)
    elif kind == "planted":
        raw = _planted_costs(num_blocks, rng)
    else:
        raise ValueError(f"instance kind must be one of {INSTANCE_KINDS}, got {kind!r}")
    return _monotone_closure(raw)


def _channel_costs(num_blocks, rng):
    channels = int(rng.integers(3, 9))
    weights = rng.lognormal(0.0, 0.5, channels)
    rates = rng.exponential(0.15, (num_blocks, channels))
    # A few blocks wipe out one channel each: expensive alone, cheap next to each other.
    for b in rng.choice(num_blocks, size=max(1, num_blocks // 5), replace=False):
        rates[b, rng.integers(channels)] += rng.exponential(2.0)
    cum = np.vstack([np.zeros(channels), np.cumsum(rates, axis=0)])
    span = cum[None, :, :] - cum[:, None, :]  # span[i, j, c] = sum of rates over [i, j)
    return (weights * (1.0 - np.exp(-np.clip(span, 0.0, None)))).sum(axis=2)


def _mixed_costs(num_blocks, rng):
    block = rng.lognormal(0.0, 0.8, num_blocks)
    gamma = rng.uniform(0.75, 1.25)
    cum = np.concatenate([[0.0], np.cumsum(block)])
    span = np.clip(cum[None, :] - cum[:, None], 0.0, None)
    noise = rng.lognormal(0.0, 0.2, (num_blocks + 1, num_blocks + 1))
    raw = span**gamma * noise
    idx = np.arange(num_blocks)
    raw[idx, idx + 1] = block  # singles are the block costs themselves
    return raw


def _planted_costs(num_blocks, rng):
    raw = _mixed_costs(num_blocks, rng)
    length = int(rng.integers(2, max(3, num_blocks // 3 + 1)))
    start = int(rng.integers(0, num_blocks - length + 1))
    high = np.quantile(np.diag(raw, 1), 0.75)
    for b in range(start, start + length):
        raw[b, b + 1] = high * rng.uniform(1.0, 1.5)
    inside = raw[start : start + length + 1, start : start + length + 1]
    cheap = np.max(np.diag(inside, 1)) * rng.uniform(1.0, 1.3)
    for i in range(start, start + length):
        for j in range(i + 2, start + length + 1):
            raw[i, j] = cheap
    return raw


def _monotone_closure(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    cost = np.full((n, n), np.nan)
    for i in range(n - 1):
        cost[i, i + 1] = raw[i, i + 1]
    for length in range(2, n):
        for i in range(n - length):
            j = i + length
            cost[i, j] = max(raw[i, j], cost[i, j - 1], cost[i + 1, j])
    return cost


# --------------------------------------------------------------------------- baselines


def _as_vector(values, num_blocks_hint: str, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < 1 or not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} must be a 1-D array of finite floats, one per block, got shape {arr.shape}; "
            f"{num_blocks_hint}"
        )
    return arr


def select_shortgpt(block_influence, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """ShortGPT: prune the ``num_prune`` unprotected blocks with the lowest block
    influence ``1 - mean cos(h_b, h_{b+1})`` in one shot; ties go to the lower index."""
    bi = _as_vector(block_influence, "pass the cache's block_influence", "block_influence")
    protect = _check_prune_request(bi.size, num_prune, protect)
    order = sorted((b for b in range(bi.size) if b not in protect), key=lambda b: (bi[b], b))
    return _make_selection("shortgpt", bi.size, order[:num_prune])


def select_angular(angular, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """Gromov et al.: prune the run ``[l, l+n)`` of ``n = num_prune`` blocks with the
    smallest angular distance ``angular[l, l+n]`` among runs with no protected block;
    ties go to the smallest ``l``."""
    angular = np.asarray(angular, dtype=float)
    if angular.ndim != 2 or angular.shape[0] != angular.shape[1] or angular.shape[0] < 2:
        raise ValueError(
            f"angular must be an (L+1)x(L+1) matrix, got shape {angular.shape}; "
            "pass the cache's angular distances"
        )
    num_blocks = angular.shape[0] - 1
    protect = _check_prune_request(num_blocks, num_prune, protect)
    n = num_prune
    if n == 0:
        return _make_selection("angular", num_blocks, ())
    starts = [l for l in range(num_blocks - n + 1) if not protect & set(range(l, l + n))]
    if not starts:
        raise ValueError(
            f"no run of {n} consecutive unprotected blocks exists among {num_blocks} blocks "
            f"with protected {sorted(protect)}; protect fewer blocks or prune fewer"
        )
    distances = [angular[l, l + n] for l in starts]
    if not np.all(np.isfinite(distances)):
        raise ValueError("angular[l, l+n] must be finite for the runs considered; recalibrate")
    best = starts[int(np.argmin(distances))]  # argmin takes the first minimum
    return _make_selection(
        "angular", num_blocks, range(best, best + n), details={"angular_distance": float(min(distances))}
    )


def select_last(num_blocks: int, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """"Reassessing Layer Pruning": prune the blocks just before the final block,
    ``L-1-n .. L-2``; protected blocks are stepped over by moving further back, and
    the final block is only taken when nothing earlier is left."""
    protect = _check_prune_request(num_blocks, num_prune, protect)
    order = [b for b in range(num_blocks - 2, -1, -1) if b not in protect]
    if num_blocks - 1 not in protect:
        order.append(num_blocks - 1)
    return _make_selection("last", num_blocks, order[:num_prune])


def select_random(num_blocks: int, num_prune: int, protect: Iterable[int] = frozenset(), seed: int = 0) -> Selection:
    """Seeded uniform choice of ``num_prune`` unprotected blocks (``numpy.default_rng(seed)``)."""
    protect = _check_prune_request(num_blocks, num_prune, protect)
    free = np.array([b for b in range(num_blocks) if b not in protect], dtype=int)
    chosen = np.random.default_rng(seed).choice(free, size=num_prune, replace=False)
    return _make_selection("random", num_blocks, chosen.tolist(), details={"seed": seed})


def select_sleb(
    num_blocks: int,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    evaluate: Callable[[frozenset], float] | None = None,
) -> Selection:
    """SLEB: ``num_prune`` greedy rounds; each tries removing every remaining unprotected
    block and keeps the removal with the lowest ``evaluate(frozenset(pruned))`` (the
    caller's calibration perplexity). Ties go to the lower index. ``run_evaluations``
    counts ``evaluate`` calls."""
    protect = _check_prune_request(num_blocks, num_prune, protect)
    if evaluate is None:
        raise ValueError(
            "the sleb method needs evaluate(pruned_set) -> calibration perplexity; "
            "run it through the calibration machinery that supplies forward passes"
        )
    pruned: set[int] = set()
    calls = 0
    trace = []
    for _ in range(num_prune):
        best_score, best_block = math.inf, None
        for b in range(num_blocks):
            if b in pruned or b in protect:
                continue
            score = float(evaluate(frozenset(pruned | {b})))
            calls += 1
            if best_block is None or score < best_score:  # strict: ties keep the lower index
                best_score, best_block = score, b
        pruned.add(best_block)
        # The greedy trace's prefixes are SLEB's answers for smaller counts (cached by plan).
        trace.append({"block": best_block, "score": best_score, "pruned": sorted(pruned), "evaluations": calls})
    return _make_selection(
        "sleb", num_blocks, pruned, run_evaluations=calls, iterations=num_prune, details={"trace": trace}
    )


# --------------------------------------------------------------------------- dispatcher


def select(
    method: str,
    num_blocks: int,
    num_prune: int,
    *,
    cost=None,
    block_influence=None,
    angular=None,
    protect: Iterable[int] = frozenset(),
    seed: int = 0,
    evaluate: Callable[[frozenset], float] | None = None,
) -> Selection:
    """Run one selector by name (one of :data:`METHODS`) with validated inputs.

    When ``cost`` is given, every method's ``objective`` is ``J(pruned)`` on it, so all
    methods can be compared on the MI-PRUN objective.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    num_blocks = _check_num_blocks(num_blocks)
    protect = _check_prune_request(num_blocks, num_prune, protect)
    if method == "mi-prun":
        result = fast_block_select(_require(cost, "cost", method, num_blocks), num_prune, protect)
    elif method == "shortgpt":
        result = select_shortgpt(_require(block_influence, "block_influence", method, num_blocks), num_prune, protect)
    elif method == "angular":
        result = select_angular(_require(angular, "angular", method, num_blocks), num_prune, protect)
    elif method == "sleb":
        result = select_sleb(num_blocks, num_prune, protect, evaluate)
    elif method == "last":
        result = select_last(num_blocks, num_prune, protect)
    else:
        result = select_random(num_blocks, num_prune, protect, seed)
    if cost is not None and result.objective is None:
        cost = _require(cost, "cost", method, num_blocks)
        result = _with_objective(result, objective_value(cost, result.pruned))
    return result


def _require(value, name: str, method: str, num_blocks: int):
    if value is None:
        raise ValueError(f"method {method!r} needs {name}; calibrate first so the cache holds it")
    arr = np.asarray(value, dtype=float)
    size = arr.shape[0] if arr.ndim else 0
    expected = num_blocks if name == "block_influence" else num_blocks + 1
    if size != expected:
        raise ValueError(
            f"{name} has {size} rows but {num_blocks} blocks need {expected}; "
            "the cache does not match this model, recalibrate"
        )
    return arr


def _with_objective(result: Selection, objective: float) -> Selection:
    from dataclasses import replace

    return replace(result, objective=objective)


# --------------------------------------------------------------------------- latency budget


def latency_floor(model, protect: Iterable[int] = frozenset()) -> float:
    """Fastest reachable latency: fixed cost, the protected blocks, and -- if nothing is
    protected -- the single cheapest block, since at least one block is always kept."""
    protect = frozenset(protect)
    if protect:
        return model.predict(protect)
    return model.fixed_s + min(model.block_s)


def max_keep_for_budget(model, budget_seconds: float, protect: Iterable[int] = frozenset()) -> int:
    """Largest keep count K for which SOME K-block set (with every protected block) meets
    the budget: the protected blocks plus the cheapest others. With identical block costs
    this is exactly the K every selector gets; with heterogeneous costs it is an upper
    bound that :func:`select_for_latency` walks down from. Returns 0 if even the floor fails."""
    protect = frozenset(protect)
    spent = model.predict(protect)
    others = sorted(model.block_s[b] for b in range(model.num_blocks) if b not in protect)
    keep = len(protect)
    tol = 1e-12 * max(1.0, abs(budget_seconds))
    for block in others:
        if spent + block > budget_seconds + tol:
            break
        spent += block
        keep += 1
    if keep == 0 or spent > budget_seconds + tol:
        return 0
    return keep


def select_for_latency(method: str, budget, latency_model, selector: Callable[[int], Selection] | None = None,
                       **select_kwargs) -> Selection:
    """Best-scoring selection whose predicted latency meets ``budget``.

    ``budget`` is a string (``"0.8"``, ``"12ms@bs8"``) or a
    :func:`~vllm_miprun.core.latency.parse_latency_budget` tuple. For K from
    :func:`max_keep_for_budget` down to 1, run ``method`` for ``L - K`` pruned blocks and
    accept the first selection whose predicted latency meets the budget. With identical
    block costs the first K tried always fits (the largest K meeting the budget); with
    heterogeneous costs a method may pick expensive blocks to keep, so a smaller K is
    tried. A budget below the floor raises ``ValueError`` stating the floor in the
    budget's own units. ``select_kwargs`` go to :func:`select`; a ``selector``
    (``num_prune -> Selection``) replaces that call, e.g. to reuse cached selections.
    """
    from vllm_miprun.core.latency import parse_latency_budget

    parsed = parse_latency_budget(budget) if isinstance(budget, str) else tuple(budget)
    kind = parsed[0]
    seconds = latency_model.budget_seconds(parsed)
    num_blocks = latency_model.num_blocks
    protect = _check_prune_request(num_blocks, 0, select_kwargs.pop("protect", frozenset()))
    floor = latency_floor(latency_model, protect)
    tol = 1e-12 * max(1.0, abs(seconds))
    top = max_keep_for_budget(latency_model, seconds, protect)
    if top == 0 or floor > seconds + tol:
        raise ValueError(
            f"latency budget {latency_model.format_seconds(seconds, kind)} is below the floor "
            f"{latency_model.format_seconds(floor, kind)} (fixed cost plus "
            f"{'the protected blocks' if protect else 'one block'}); raise the budget"
        )
    lowest = max(1, len(protect))
    for keep in range(top, lowest - 1, -1):
        result = (selector(num_blocks - keep) if selector is not None
                  else select(method, num_blocks, num_blocks - keep, protect=protect, **select_kwargs))
        predicted = latency_model.predict(result.kept)
        if predicted <= seconds + tol:
            details = {
                **result.details,
                "latency_budget_s": seconds,
                "predicted_latency_s": predicted,
                "predicted_speedup": latency_model.speedup(result.kept),
                "latency_source": latency_model.source,
            }
            from dataclasses import replace

            return replace(result, details=details)
    raise ValueError(
        f"no {method} selection meets the latency budget {latency_model.format_seconds(seconds, kind)}; "
        f"the floor is {latency_model.format_seconds(floor, kind)}; raise the budget"
    )
