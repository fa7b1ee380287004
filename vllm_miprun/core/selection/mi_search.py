"""MI-PRUN's search over pruned sets, given a calibration loss: pure, no model inside.

The cheap span costs rank candidate pruned sets without any forward pass; the caller's
``evaluate(pruned_set)`` -- the pruned model's calibration loss, i.e. ``H(Y)`` minus the
Barber-Agakov bound on the next-token MI (:mod:`vllm_miprun.pipeline.refine` measures it
with forward passes) -- is called for only a few of them.

Search (:func:`mi_prun_search` = :func:`mi_guided_greedy` + :func:`portfolio_refine`, the default)
--------------------------------------------------------------------------------------------------
Blocks are removed one at a time, as in SLEB, but each round only measures the bound for
the ``candidates`` blocks whose removal the span cost says is cheapest *given the blocks
already removed*: the marginal objective ``J(P + {b}) - J(P)``, which merges ``b`` with
adjacent pruned runs and prices the merged run by its own span cost.

The span costs describe the *full* model. Once the pruned model has drifted ``drift`` nats
per token (KL to the full model) from it, they stop saying which block the pruned model can
spare, so a round then ranks by ``block_noise(P)[b]``: block ``b``'s skip-channel noise
fraction ``exp(-2 I_skip / d)`` re-measured on the pruned model's own boundary states (SLEB's
strength, re-measuring after each removal, at MI's cost: the states come free with the last
measurement), and measures ``wide_candidates`` blocks. Below the drift the span costs stay in
charge: they are measured on every calibration sequence, the re-measured MI only on the
bound's few, and ranking by it there made the choice at keep 0.9 depend on the calibration
seed (SmolLM2: mean Jaccard 0.53 over 5 seeds, against 1.00). The rule reads only the set so
far, so one greedy trace still gives the selection for every smaller drop count (a prefix).

``swap_refine`` is the alternative: start from the exact span-cost optimum and try the
cheapest single swaps (one pruned block out, one kept block in) until none improves.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import numpy as np

from vllm_miprun.core.selection.fast_block import fast_block_select
from vllm_miprun.core.selection.objective import objective_value
from vllm_miprun.core.selection.result import Selection, make_selection
from vllm_miprun.core.selection.runs import exact_select

# Past DRIFT_NATS of KL to the full model per calibration token, a greedy round ranks by the
# pruned model's own skip-channel MI and measures WIDE_CANDIDATES blocks instead of
# ``candidates`` (see the module docstring). Chosen on SmolLM2-135M's calibration text: in a
# trace that measured 8 blocks every round at keep 0.6, the best block was ranked 6th to 8th
# in 3 of the 5 rounds past 1 nat. At keep 0.75 and milder no round starts past 1 nat there.
DRIFT_NATS = 1.0
WIDE_CANDIDATES = 8


def mi_prun_search(
    evaluate: Callable[[frozenset], float],
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    candidates: int = 3,
    powers: tuple[float, ...] = (1.0, 2.0),
    cost_power: float = 2.0,
    block_noise: Callable[[frozenset], Sequence[float]] | None = None,
    wide_candidates: int = WIDE_CANDIDATES,
    drift: float = DRIFT_NATS,
    known: Sequence[int] = (),
) -> Selection:
    """MI-PRUN's default search (the best configuration found on SmolLM2-135M).

    1. :func:`mi_guided_greedy`, ranking each round's ``candidates`` by the span ``cost``
       of :func:`vllm_miprun.core.span_cost.span_cost_matrix` (which is the skip-MI noise
       fraction raised to ``cost_power``); past ``drift``, ``wide_candidates`` ranked by
       ``block_noise`` (the pruned model's own skip-MI noise fraction per block).
    2. :func:`portfolio_refine` between the greedy set and the exact span-cost optima with
       the cost re-raised to each of ``powers`` (power 1 favours one contiguous run, power
       2 spreads the blocks); the lowest ``evaluate`` (= highest Barber-Agakov bound)
       wins. The span-cost optima come from Fast-Block-Select.

    Protected blocks are never proposed. ``details["greedy_trace"]`` keeps the greedy's
    rounds; ``known`` is passed to the greedy.
    """
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    protect = frozenset(protect)
    if num_prune == 0:
        return make_selection("mi-prun", num_blocks, (), cost)
    greedy = mi_guided_greedy(evaluate, cost, num_prune, protect, candidates=candidates, block_noise=block_noise,
                              wide_candidates=wide_candidates, drift=drift, known=known)
    proposals = {"greedy": greedy.pruned}
    for power in powers:
        powered = np.clip(cost, 0.0, None) ** (float(power) / float(cost_power))
        # Fast-Block-Select: the paper's search, certified optimal on DPI-monotone costs.
        proposals[f"span_fbs_p{power:g}"] = fast_block_select(powered, num_prune, protect).pruned
    result = portfolio_refine(evaluate, proposals, num_blocks, cost)
    return replace(result, details={**result.details, "greedy_trace": greedy.details["trace"],
                                    "candidates": candidates, "known_rounds": greedy.details["known_rounds"]})


def mi_guided_greedy(
    evaluate: Callable[[frozenset], float],
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    candidates: int = 3,
    block_noise: Callable[[frozenset], Sequence[float]] | None = None,
    wide_candidates: int = WIDE_CANDIDATES,
    drift: float = DRIFT_NATS,
    known: Sequence[int] = (),
) -> Selection:
    """Greedy removal; each round measures ``evaluate`` (calibration loss) for only the
    ``candidates`` blocks with the smallest marginal span cost ``J(P+{b}) - J(P)``; once
    ``evaluate(P) - evaluate({}) >= drift``, for the ``wide_candidates`` blocks with the
    smallest ``block_noise(P)`` (per block, of the model with ``P`` pruned) when it is given.

    ``details["trace"]`` lists each round's chosen block and loss, so the first ``r``
    entries are the selection for ``r`` pruned blocks.

    ``known`` is the block order of an earlier run with the same ``evaluate``, ``cost`` and
    settings (its trace's blocks): the rule reads only the set so far, so its first
    ``num_prune`` rounds are taken as they are, with only the set they reach measured.
    """
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    protect = frozenset(protect)
    known = [int(b) for b in known][:num_prune]
    if len(set(known)) != len(known) or not all(0 <= b < num_blocks and b not in protect for b in known):
        raise ValueError(f"known must list distinct unprotected blocks in 0..{num_blocks - 1}, got {known}")
    pruned: set[int] = set(known)
    trace = [{"block": b, "loss": None, "tried": [], "evaluations": 0, "block_passes": None} for b in known]
    evaluations = 0
    origin = float(evaluate(frozenset())) if num_prune else 0.0  # the full model's (KL: 0)
    loss = float(evaluate(frozenset(pruned))) if known else origin
    if known:
        trace[-1]["loss"] = loss
    for _ in range(num_prune - len(known)):
        free = [b for b in range(num_blocks) if b not in pruned and b not in protect]
        drifted = loss - origin >= drift
        ranked = sorted(free, key=_ranking(cost, frozenset(pruned), block_noise if drifted else None))
        width = max(candidates, wide_candidates) if drifted else candidates
        best = (math.inf, None)
        for b in ranked[:width]:
            value = float(evaluate(frozenset(pruned | {b})))
            evaluations += 1
            if value < best[0]:
                best = (value, b)
        pruned.add(best[1])
        loss = best[0]
        trace.append({"block": best[1], "loss": best[0], "tried": ranked[:width],
                      "evaluations": evaluations,
                      "block_passes": getattr(evaluate, "block_passes", None)})
    return make_selection(
        "mi-prun", num_blocks, pruned, cost, run_evaluations=evaluations, iterations=num_prune,
        details={"trace": trace, "search": "mi_guided_greedy", "candidates": candidates,
                 "drift": drift, "wide_candidates": wide_candidates, "known_rounds": len(known)},
    )


def _ranking(cost: np.ndarray, pruned: frozenset, block_noise) -> Callable[[int], tuple]:
    """Sort key of the free blocks: the pruned model's noise fraction, else the marginal span cost."""
    if block_noise is not None:
        noise = block_noise(pruned)
        return lambda b: (float(noise[b]), b)
    base = objective_value(cost, pruned) if pruned else 0.0
    return lambda b: (objective_value(cost, pruned | {b}) - base, b)


def swap_refine(
    evaluate: Callable[[frozenset], float],
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    top_swaps: int = 4,
    max_evaluations: int = 40,
    start: Iterable[int] | None = None,
) -> Selection:
    """Local search from the exact span-cost optimum (or ``start``): each round measures
    ``evaluate`` for the ``top_swaps`` untried single swaps with the lowest span objective
    and moves to the best if it lowers the loss; stops when a round brings no improvement
    or the budget of evaluations is spent."""
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    protect = frozenset(protect)
    current = frozenset(exact_select(cost, num_prune, protect).pruned if start is None else start)
    best_value = float(evaluate(current))
    evaluations, tried = 1, {current}
    trace = [{"pruned": sorted(current), "loss": best_value}]
    while evaluations < max_evaluations:
        swaps = []
        for b in current:
            for c in range(num_blocks):
                if c in current or c in protect:
                    continue
                cand = (current - {b}) | {c}
                if cand not in tried:
                    swaps.append((objective_value(cost, cand), tuple(sorted(cand))))
        swaps.sort()
        improved = None
        for _, cand in swaps[:top_swaps]:
            if evaluations >= max_evaluations:
                break
            cand = frozenset(cand)
            tried.add(cand)
            value = float(evaluate(cand))
            evaluations += 1
            if value < best_value:
                best_value, improved = value, cand
        if improved is None:
            break
        current = improved
        trace.append({"pruned": sorted(current), "loss": best_value})
    return make_selection(
        "mi-prun", num_blocks, current, cost, run_evaluations=evaluations,
        iterations=len(trace), details={"trace": trace, "search": "swap_refine"},
    )


def portfolio_refine(
    evaluate: Callable[[frozenset], float],
    proposals: dict[str, Iterable[int]],
    num_blocks: int,
    cost: np.ndarray | None = None,
) -> Selection:
    """Arbitrate between cheap proposals with the next-token MI bound: measure
    ``evaluate`` (calibration loss = H(Y) - BA bound) for each distinct proposed set and
    return the lowest. ``proposals`` maps a name to a pruned set, e.g. the exact
    span-cost optima at powers 1 and 2 and the :func:`mi_guided_greedy` result.
    ``details["scores"]`` lists every proposal's loss."""
    scores = {}
    seen: dict[frozenset, float] = {}
    for name, pruned in proposals.items():
        key = frozenset(int(b) for b in pruned)
        if key not in seen:
            seen[key] = float(evaluate(key))
        scores[name] = {"pruned": sorted(key), "loss": seen[key]}
    best = min(scores, key=lambda n: (scores[n]["loss"], scores[n]["pruned"]))
    return make_selection(
        "mi-prun", num_blocks, scores[best]["pruned"], cost, run_evaluations=len(seen),
        details={"search": "portfolio", "chosen": best, "scores": scores},
    )
