"""JSON as the project parses what users and disks hand it: no key given twice.

Plain ``json.loads`` keeps the last of two equal keys without a word, so a typo'd
duplicate in an option object, a safetensors header or a score cache would silently
change what is read. Every place that parses such JSON itself goes through :func:`loads`.
"""

from __future__ import annotations

import json
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
