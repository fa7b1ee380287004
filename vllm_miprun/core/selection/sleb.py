"""SLEB (Song et al., 2024): remove blocks one at a time, each time the block whose
removal hurts the calibration loss least.

SLEB lives in two halves, split by purity:

- here, the search: :func:`select_sleb` (the greedy, given any ``evaluate(pruned_set)``)
  and :func:`prefix_answers` (its trace's prefixes are its answers for smaller counts,
  which the planner stores in the score cache);
- :func:`vllm_miprun.pipeline.refine.sleb`, the objective: the pruned model's
  cross-entropy on calibration tokens (:class:`~vllm_miprun.pipeline.refine.CalibrationCE`),
  measured with forward passes, then this greedy.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from vllm_miprun.core.selection.result import Selection, check_prune_request, make_selection


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
    protect = check_prune_request(num_blocks, num_prune, protect)
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
        # The greedy trace's prefixes are SLEB's answers for smaller counts (see prefix_answers).
        trace.append({"block": best_block, "score": best_score, "pruned": sorted(pruned), "evaluations": calls})
    return make_selection(
        "sleb", num_blocks, pruned, run_evaluations=calls, iterations=num_prune, details={"trace": trace}
    )


def prefix_answers(result: Selection) -> dict[int, list[int]]:
    """SLEB's answers for every count up to its own, read from its greedy trace: round
    ``r`` extends round ``r - 1`` by one block, so its pruned set is SLEB's answer for ``r``."""
    return {len(step["pruned"]): list(step["pruned"])
            for step in result.details.get("trace") or [] if "pruned" in step}
