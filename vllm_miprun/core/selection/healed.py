"""The healed quality step: from the count the unhealed walk chose, the most blocks whose
*healed* ratio stays within a budget (:func:`healed_count`). Pure: the ratio comes from a
callback, each call of which costs one heal fit and one measurement."""

from __future__ import annotations

from typing import Callable

from vllm_miprun.core.selection.quality import QualityWalk


def healed_count(budget: float, start: int, max_prune: int, ratio_for: Callable[[int], float]) -> QualityWalk:
    """The largest ``n`` in ``[0, max_prune]`` with ``ratio_for(n) <= budget``, found by steps of
    one from ``start`` (the unhealed walk's count): up while the next count fits, else down
    until one fits (0, the dense model, always does and is never measured).

    The heal lowers the ratio of most sets a little, so the answer is usually ``start`` or
    ``start + 1`` and costs two calls; under a ratio that grows with ``n`` it is exact."""
    if not 0 <= start <= max_prune:
        raise ValueError(f"start must be in [0, {max_prune}], got {start}")
    ratios: dict[int, float] = {}

    def measured(count: int) -> float:
        ratios[count] = float(ratio_for(count))
        return ratios[count]

    count = start
    if count == 0 or measured(count) <= budget:
        while count < max_prune and measured(count + 1) <= budget:
            count += 1
        return QualityWalk(count, ratios)
    count -= 1
    while count > 0 and measured(count) > budget:
        count -= 1
    return QualityWalk(count, ratios)
