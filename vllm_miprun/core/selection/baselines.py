"""The baselines MI-PRUN is compared with, each a small pure function returning a
:class:`~vllm_miprun.core.selection.result.Selection`: ShortGPT, angular distance, the last
blocks, a seeded random choice. SLEB, which needs forward passes, is in :mod:`.sleb`."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from vllm_miprun.core.selection.result import Selection, check_prune_request, make_selection


def _as_vector(values, num_blocks_hint: str, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < 1 or not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} must be a 1-D array of finite floats, one per block, got shape {arr.shape}; "
            f"{num_blocks_hint}"
        )
    return arr


def select_shortgpt(block_influence, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """ShortGPT: prune the ``num_prune`` unprotected blocks with the lowest block
    influence ``1 - mean cos(h_b, h_{b+1})`` in one shot; ties go to the lower index."""
    bi = _as_vector(block_influence, "pass the cache's block_influence", "block_influence")
    protect = check_prune_request(bi.size, num_prune, protect)
    order = sorted((b for b in range(bi.size) if b not in protect), key=lambda b: (bi[b], b))
    return make_selection("shortgpt", bi.size, order[:num_prune])


def select_angular(angular, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """Gromov et al.: prune the run ``[l, l+n)`` of ``n = num_prune`` blocks with the
    smallest angular distance ``angular[l, l+n]`` among runs with no protected block;
    ties go to the smallest ``l``."""
    angular = np.asarray(angular, dtype=float)
    if angular.ndim != 2 or angular.shape[0] != angular.shape[1] or angular.shape[0] < 2:
        raise ValueError(
            f"angular must be an (L+1)x(L+1) matrix, got shape {angular.shape}; "
            "pass the cache's angular distances"
        )
    num_blocks = angular.shape[0] - 1
    protect = check_prune_request(num_blocks, num_prune, protect)
    n = num_prune
    if n == 0:
        return make_selection("angular", num_blocks, ())
    starts = [l for l in range(num_blocks - n + 1) if not protect & set(range(l, l + n))]
    if not starts:
        raise ValueError(
            f"no run of {n} consecutive unprotected blocks exists among {num_blocks} blocks "
            f"with protected {sorted(protect)}; protect fewer blocks or prune fewer"
        )
    distances = [angular[l, l + n] for l in starts]
    if not np.all(np.isfinite(distances)):
        raise ValueError("angular[l, l+n] must be finite for the runs considered; recalibrate")
    best = starts[int(np.argmin(distances))]  # argmin takes the first minimum
    return make_selection(
        "angular", num_blocks, range(best, best + n), details={"angular_distance": float(min(distances))}
    )


def select_last(num_blocks: int, num_prune: int, protect: Iterable[int] = frozenset()) -> Selection:
    """"Reassessing Layer Pruning": prune the blocks just before the final block,
    ``L-1-n .. L-2``; protected blocks are stepped over by moving further back, and
    the final block is only taken when nothing earlier is left."""
    protect = check_prune_request(num_blocks, num_prune, protect)
    order = [b for b in range(num_blocks - 2, -1, -1) if b not in protect]
    if num_blocks - 1 not in protect:
        order.append(num_blocks - 1)
    return make_selection("last", num_blocks, order[:num_prune])


def select_random(num_blocks: int, num_prune: int, protect: Iterable[int] = frozenset(), seed: int = 0) -> Selection:
    """Seeded uniform choice of ``num_prune`` unprotected blocks (``numpy.default_rng(seed)``)."""
    protect = check_prune_request(num_blocks, num_prune, protect)
    free = np.array([b for b in range(num_blocks) if b not in protect], dtype=int)
    chosen = np.random.default_rng(seed).choice(free, size=num_prune, replace=False)
    return make_selection("random", num_blocks, chosen.tolist(), details={"seed": seed})
