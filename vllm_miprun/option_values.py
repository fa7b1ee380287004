"""The parsers of the target options (keep, latency_budget, quality_budget, drop) and the
bounds every option value is checked against; the option table is :mod:`vllm_miprun.options`.

Each parser takes what any source gives (CLI text, JSON values, Python values), returns the
checked value and raises ``OptionError`` in one line that shows at most ``SHOWN_CHARS`` of it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vllm_miprun.core.latency import parse_latency_budget as parse_budget
from vllm_miprun.errors import OptionError

# Bounds that keep every value small enough to check, show and use.
MAX_BLOCK_INDEX = 99_999        # no model has this many decoder blocks
MAX_TEXT_CHARS = 4096           # a path or a block list; PATH_MAX on Linux
MAX_BYTES = 2**63 - 1
SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)`` for an error message: one line, at most ``SHOWN_CHARS`` characters,
    and never an error itself (Python refuses to print integers of over 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of over 4300 digits, alone or inside a list or object
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else \
            f"<a {type(value).__name__} holding an integer of over 4300 digits>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def parse_keep(value: Any) -> float:
    """A keep ratio in (0, 1]; strings such as "0.75" are accepted."""
    try:
        ratio = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"keep must be a number in (0, 1], got {shown(value)}; e.g. --miprun-keep 0.75") from None
    if isinstance(value, bool) or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise OptionError(f"keep must be a number in (0, 1], got {shown(value)}; e.g. --miprun-keep 0.75")
    return ratio


def parse_latency_budget(value: Any) -> str:
    """A budget ``core.latency`` reads (``0.8``, ``12ms``, ``12ms@bs8``), kept as text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or _longer_than_shown(value):
        raise OptionError(f"latency_budget must be a fraction such as 0.8 or a time such as 12ms@bs8, "
                          f"got {shown(value)}")
    text = str(value).strip()
    try:
        parse_budget(text)
    except (ValueError, OverflowError) as err:
        raise OptionError(" ".join(str(err).split())) from None
    return text


def _longer_than_shown(value: str | int | float) -> bool:
    try:
        return len(str(value)) > SHOWN_CHARS
    except ValueError:  # an integer of over 4300 digits
        return True


def parse_quality_budget(value: Any) -> float:
    """The largest validation perplexity ratio to the dense model: a finite number > 1."""
    try:
        ratio = float(value)
    except (TypeError, ValueError, OverflowError):
        ratio = math.nan
    if isinstance(value, bool) or not math.isfinite(ratio) or ratio <= 1.0:
        raise OptionError(f"quality_budget must be a finite number > 1, got {shown(value)}; it is the largest "
                          "perplexity ratio to the dense model to allow, e.g. --miprun-quality-budget 1.3")
    return ratio


_DROP_ITEM = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def parse_drop(value: Any) -> tuple[int, ...]:
    """Blocks to prune: ``"12-18,25"``, an index, or a list of indices and ``"a-b"`` ranges.
    Returns the sorted indices; a block named twice is an error (likely a typo)."""
    if isinstance(value, str) and len(value) <= MAX_TEXT_CHARS:
        items: list = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple)) and len(value) <= MAX_BLOCK_INDEX:
        items = list(value)
    else:
        raise OptionError(f"drop must be block indices and ranges such as '12-18,25', got {shown(value)}")
    seen: set[int] = set()
    for item in items:  # stops at the first repeat: ranges repeated in a long list never all expand
        blocks = _drop_item(item)
        twice = seen.intersection(blocks)
        if twice:
            raise OptionError(f"drop names block(s) {shown(sorted(twice))} more than once in {shown(value)}; "
                              "name each block once")
        seen.update(blocks)
    if not seen:
        raise OptionError(f"drop names no block, got {shown(value)}; give indices and ranges such as 12-18,25")
    return tuple(sorted(seen))


def _drop_item(item: Any) -> list[int]:
    hint = f"use indices 0..{MAX_BLOCK_INDEX} and ranges a-b with a <= b, e.g. --miprun-drop 12-18,25"
    if isinstance(item, int) and not isinstance(item, bool):
        if not 0 <= item <= MAX_BLOCK_INDEX:
            why = "is negative" if item < 0 else "is out of range"
            raise OptionError(f"drop block {shown(item)} {why}; {hint}")
        return [item]
    match = _DROP_ITEM.match(item.strip()) if isinstance(item, str) and len(item) <= 32 else None
    if match is None:
        raise OptionError(f"cannot read drop item {shown(item)}; {hint}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if max(first, last) > MAX_BLOCK_INDEX:
        raise OptionError(f"drop item {shown(item)} is out of range; {hint}")
    if last < first:
        raise OptionError(f"drop range {shown(item)} runs backwards; write {last}-{first}")
    return list(range(first, last + 1))


def check_drop(drop: tuple[int, ...], num_blocks: int, protect: frozenset[int]) -> None:
    """The model-dependent checks of ``drop``: indices exist, one block stays, none is protected."""
    outside = [b for b in drop if b >= num_blocks]
    if outside:
        raise OptionError(f"drop names block(s) {outside}, but the model has {num_blocks} blocks "
                          f"(0..{num_blocks - 1}); give indices in that range")
    if len(drop) >= num_blocks:
        raise OptionError(f"drop names all {num_blocks} blocks; at least one must be kept")
    both = sorted(protect.intersection(drop))
    if both:
        raise OptionError(f"block(s) {both} are both in drop and in protect; remove them from one of the two")
