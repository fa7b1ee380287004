"""JSON as the project parses what users and disks hand it: no key given twice.

Plain ``json.loads`` keeps the last of two equal keys without a word, so a typo'd
duplicate in an option object, a safetensors header or a score cache would silently
change what is read. Every place that parses such JSON itself goes through :func:`loads`.
JSON numbers read as Python ints of any size, which :func:`is_finite` takes too; and a
file is read whole only when :func:`unreadable_reason` finds nothing against it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` that raises ``ValueError`` naming a key an object gives twice."""
    return json.loads(text, object_pairs_hook=_object_without_repeats, **kwargs)


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key[:80]!r} appears more than once in one object")
        seen.add(key)
    return dict(pairs)


def is_finite(number: int | float) -> bool:
    """``math.isfinite`` that answers False for an integer beyond float range (it raises)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def unreadable_reason(info: os.stat_result, max_bytes: int) -> str | None:
    """Why a file with this ``stat`` must not be read whole, or None: not a regular file
    (a FIFO would hang the read, a device never end) or longer than ``max_bytes``."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return f"{info.st_size} bytes long" if info.st_size > max_bytes else None
