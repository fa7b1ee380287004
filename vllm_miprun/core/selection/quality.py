"""The quality walk: the most blocks a selector may prune while a measured quality ratio
stays within a budget (:func:`most_pruned_within`). Pure: the ratio comes from a callback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class QualityWalk:
    """``num_prune``: the count chosen; ``ratios``: every count measured -> its ratio."""

    num_prune: int
    ratios: dict[int, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ratios.get(self.num_prune, 1.0)


def most_pruned_within(budget: float, max_prune: int, ratio_for: Callable[[int], float]) -> QualityWalk:
    """The largest ``n`` in ``[0, max_prune]`` with ``ratio_for(n) <= budget``.

    ``ratio_for(n)`` is the quality ratio (pruned over dense perplexity) of the selector's
    set for ``n`` pruned blocks; ``n = 0`` is the dense model, ratio 1, never measured. The
    ratio grows with ``n`` for every selector here. So the walk gallops up (1, 2, 4, ...)
    to the first count over budget, then bisects between it and the last count within:
    about ``2 log2(n) + 1`` measurements, none past ``2n``. Counts far past the answer are
    the dearest to measure (a search for ``n`` blocks grows with ``n``), and a bisection
    from ``max_prune`` would start with the dearest of all. The answer is always a count
    whose ratio was measured within budget (or 0), and ``n + 1`` was measured over budget
    unless ``n = max_prune``.
    """
    if max_prune < 0:
        raise ValueError(f"max_prune must be >= 0, got {max_prune}")
    ratios: dict[int, float] = {}

    def fits(count: int) -> bool:
        ratios[count] = float(ratio_for(count))
        return ratios[count] <= budget

    within, over, step = 0, None, 1
    while over is None and within < max_prune:
        count = min(step, max_prune)
        if fits(count):
            within = count
        else:
            over = count
        step *= 2
    if over is None:
        return QualityWalk(within, ratios)
    while over - within > 1:
        middle = (within + over) // 2
        if fits(middle):
            within = middle
        else:
            over = middle
    return QualityWalk(within, ratios)
