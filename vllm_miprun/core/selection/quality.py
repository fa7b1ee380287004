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
    ratio grows with ``n`` for every selector here, so a bisection finds the count with
    ``log2(max_prune) + 1`` measurements; the answer is always one whose ratio was measured
    within budget (or 0), and ``n + 1`` was measured over budget unless ``n = max_prune``.
    """
    if max_prune < 0:
        raise ValueError(f"max_prune must be >= 0, got {max_prune}")
    ratios: dict[int, float] = {}

    def fits(count: int) -> bool:
        if count == 0:
            return True
        ratios[count] = float(ratio_for(count))
        return ratios[count] <= budget

    if fits(max_prune):
        return QualityWalk(max_prune, ratios)
    within, over = 0, max_prune
    while over - within > 1:
        middle = (within + over) // 2
        if fits(middle):
            within = middle
        else:
            over = middle
    return QualityWalk(within, ratios)
