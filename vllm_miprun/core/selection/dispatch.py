"""Run a selector by name (:func:`select`), or pick the best-scoring selection that meets
a latency budget (:func:`select_for_latency`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import numpy as np

from vllm_miprun.core.latency import parse_latency_budget
from vllm_miprun.core.selection.baselines import select_angular, select_last, select_random, select_shortgpt
from vllm_miprun.core.selection.fast_block import fast_block_select
from vllm_miprun.core.selection.objective import objective_value
from vllm_miprun.core.selection.result import METHODS, Selection, check_num_blocks, check_prune_request
from vllm_miprun.core.selection.sleb import select_sleb



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
    num_blocks = check_num_blocks(num_blocks)
    protect = check_prune_request(num_blocks, num_prune, protect)
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
    parsed = parse_latency_budget(budget) if isinstance(budget, str) else tuple(budget)
    kind = parsed[0]
    seconds = latency_model.budget_seconds(parsed)
    num_blocks = latency_model.num_blocks
    protect = check_prune_request(num_blocks, 0, select_kwargs.pop("protect", frozenset()))
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
            return replace(result, details=details)
    raise ValueError(
        f"no {method} selection meets the latency budget {latency_model.format_seconds(seconds, kind)}; "
        f"the floor is {latency_model.format_seconds(floor, kind)}; raise the budget"
    )
