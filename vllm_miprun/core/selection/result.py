"""What every selector returns (:class:`Selection`), and the checks on what it is asked:
keep and prune counts, protected blocks, and the number of blocks to prune."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from vllm_miprun.core.selection.objective import maximal_runs, objective_value

METHODS = ("mi-prun", "shortgpt", "angular", "sleb", "last", "random")
DEFAULT_METHOD = "mi-prun"


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


def make_selection(method, num_blocks, pruned, cost=None, **extra) -> Selection:
    """A :class:`Selection` of ``pruned`` (any order); ``objective`` is ``J(pruned)`` when
    ``cost`` is given. ``details`` and the counters go through ``extra``."""
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
    check_num_blocks(num_blocks)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}; {hint}")
    return max(1, min(num_blocks, math.floor(ratio * num_blocks + 0.5 + 1e-9)))


def prune_count(ratio: float, num_blocks: int) -> int:
    """Number of blocks pruned for a keep ratio: ``L - keep_count(ratio, L)``."""
    return num_blocks - keep_count(ratio, num_blocks)


def check_num_blocks(num_blocks) -> int:
    """``num_blocks`` as an int after checking it is a positive integer."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral) or num_blocks < 1:
        raise ValueError(f"number of blocks must be a positive integer, got {num_blocks!r}")
    return int(num_blocks)


# --------------------------------------------------------------------------- protect and prune requests


def parse_protect(spec, num_blocks: int) -> frozenset[int]:
    """Blocks that must be kept, from ``"first"``, ``"last"``, ``"first,last"``, ``"0,29"``,
    an int, or a list of those. ``None`` or ``""`` protects nothing (the default: the
    scores decide whether the first and last blocks may go)."""
    num_blocks = check_num_blocks(num_blocks)
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
    hint = f"use 'first', 'last' or an index in 0..{num_blocks - 1}, e.g. --miprun-protect first,last"
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


def check_prune_request(num_blocks: int, num_prune, protect) -> frozenset[int]:
    """Validate ``num_prune`` and ``protect``; return ``protect`` as a frozenset."""
    num_blocks = check_num_blocks(num_blocks)
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


