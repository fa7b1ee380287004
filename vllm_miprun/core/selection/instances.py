"""Random span-cost matrices that obey the DPI: the instances on which the tests and
``benchmarks/bench_select.py`` compare Fast-Block-Select with the exact optimum."""

from __future__ import annotations

import numpy as np

from vllm_miprun.core.selection.result import check_num_blocks
from vllm_miprun.core.span_cost import monotone_closure, upper_triangle

INSTANCE_KINDS = ("channels", "mixed", "planted")


def random_dpi_cost(num_blocks: int, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A random span-cost matrix that obeys the DPI and is not additive.

    Kinds (``None`` picks one at random):

    - ``"channels"``: a Markov chain carrying several independent channels; block ``b``
      erodes channel ``c`` at rate ``r[b, c]`` and a run loses
      ``sum_c w_c * (1 - exp(-sum_b r[b, c]))`` -- saturating, so runs of blocks that
      erode the same channel are sub-additive (cheap together, dear alone).
    - ``"mixed"``: log-normal block costs; a run costs ``(sum)^gamma`` times log-normal
      noise with a per-instance ``gamma`` in [0.75, 1.25] (sub- or super-additive).
    - ``"planted"``: ``"mixed"`` plus a middle run of 2..L/3 blocks whose singles look
      expensive but which is cheap as a whole.

    Every kind ends with a monotone closure (running maxima over the two one-shorter
    sub-runs), so ``cost[i, j] >= max(cost[i, k], cost[k, j])`` holds exactly.
    """
    num_blocks = check_num_blocks(num_blocks)
    if kind is None:
        kind = INSTANCE_KINDS[int(rng.integers(len(INSTANCE_KINDS)))]
    if kind == "channels":
        raw = _channel_costs(num_blocks, rng)
    elif kind == "mixed":
        raw = _mixed_costs(num_blocks, rng)
    elif kind == "planted":
        raw = _planted_costs(num_blocks, rng)
    else:
        raise ValueError(f"instance kind must be one of {INSTANCE_KINDS}, got {kind!r}")
    return monotone_closure(upper_triangle(raw))


def _channel_costs(num_blocks, rng):
    channels = int(rng.integers(3, 9))
    weights = rng.lognormal(0.0, 0.5, channels)
    rates = rng.exponential(0.15, (num_blocks, channels))
    # A few blocks wipe out one channel each: expensive alone, cheap next to each other.
    for b in rng.choice(num_blocks, size=max(1, num_blocks // 5), replace=False):
        rates[b, rng.integers(channels)] += rng.exponential(2.0)
    cum = np.vstack([np.zeros(channels), np.cumsum(rates, axis=0)])
    span = cum[None, :, :] - cum[:, None, :]  # span[i, j, c] = sum of rates over [i, j)
    return (weights * (1.0 - np.exp(-np.clip(span, 0.0, None)))).sum(axis=2)


def _mixed_costs(num_blocks, rng):
    block = rng.lognormal(0.0, 0.8, num_blocks)
    gamma = rng.uniform(0.75, 1.25)
    cum = np.concatenate([[0.0], np.cumsum(block)])
    span = np.clip(cum[None, :] - cum[:, None], 0.0, None)
    noise = rng.lognormal(0.0, 0.2, (num_blocks + 1, num_blocks + 1))
    raw = span**gamma * noise
    idx = np.arange(num_blocks)
    raw[idx, idx + 1] = block  # singles are the block costs themselves
    return raw


def _planted_costs(num_blocks, rng):
    raw = _mixed_costs(num_blocks, rng)
    length = int(rng.integers(2, max(3, num_blocks // 3 + 1)))
    start = int(rng.integers(0, num_blocks - length + 1))
    high = np.quantile(np.diag(raw, 1), 0.75)
    for b in range(start, start + length):
        raw[b, b + 1] = high * rng.uniform(1.0, 1.5)
    inside = raw[start : start + length + 1, start : start + length + 1]
    cheap = np.max(np.diag(inside, 1)) * rng.uniform(1.0, 1.3)
    for i in range(start, start + length):
        for j in range(i + 2, start + length + 1):
            raw[i, j] = cheap
    return raw
