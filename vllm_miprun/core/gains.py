"""What pruning gains, in figures: KV bytes, KV capacity, throughput against a baseline.

Pure: no file I/O and no vLLM. ``vllm/metrics.py`` exports these figures as
Prometheus gauges, the speed benchmark sizes its KV memory with :func:`exact_kv_memory`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_miprun import strict_json
from vllm_miprun.core.latency import LatencyModel, kv_bytes_per_token_per_block, text_config

logger = logging.getLogger(__name__)

WINDOW_S = 60.0  # sliding window of miprun_generation_tokens_per_second


def kv_bytes_per_token_saved(config: Mapping[str, Any], num_pruned: int, dtype_bytes: int) -> int:
    """KV-cache bytes per token that ``num_pruned`` pruned blocks never allocate."""
    return num_pruned * kv_bytes_per_token_per_block(config, dtype_bytes)


def exact_kv_memory(config: Mapping[str, Any], dtype_bytes: int, kept: int, at_least: int,
                    page_tokens: int = 128) -> int:
    """Smallest KV memory >= ``at_least`` bytes that holds a whole number of
    ``page_tokens``-token pages for both L and ``kept`` layers, so the KV capacity ratio
    of the pruned model to the full one is exactly ``L / kept`` (no floor rounding)."""
    num_blocks = int(text_config(config)["num_hidden_layers"])
    unit = kv_bytes_per_token_per_block(config, dtype_bytes) * page_tokens * math.lcm(num_blocks, kept)
    return unit * max(1, math.ceil(at_least / unit))


def kv_capacity_ratio(pruned: Mapping[str, int], full: Mapping[str, int], engine_blocks: int | None,
                      fixed_memory: int | None, freed_bytes: int = 0) -> float | None:
    """KV tokens that fit with the pruned model over those of the full model (pure).

    ``pruned``/``full`` are vLLM's KV layouts (``bytes_per_block`` of the shared pool,
    ``blocks_per_request`` for a ``max_model_len`` request); capacity is blocks /
    blocks per request. ``engine_blocks`` is the pruned engine's block count. With a
    fixed KV size (``fixed_memory``: ``--kv-cache-memory-bytes``, or the CPU's
    ``VLLM_CPU_KVCACHE_SPACE``) both models get that memory; otherwise the pool is what
    the memory budget left after the weights, so the full model's is ``freed_bytes``
    (the pruned weights on one rank) smaller. None when it cannot be known.
    """
    if fixed_memory is not None:
        blocks_pruned = engine_blocks or fixed_memory // pruned["bytes_per_block"]
        memory_full = fixed_memory
    elif engine_blocks:
        blocks_pruned = engine_blocks
        # the engine's pool, known to one block: take the middle of that block
        memory_full = (engine_blocks + 0.5) * pruned["bytes_per_block"] - freed_bytes
    else:
        return None
    blocks_full = memory_full // full["bytes_per_block"]
    if blocks_full <= 0 or blocks_pruned <= 0:
        return None
    return (blocks_pruned / pruned["blocks_per_request"]) / (blocks_full / full["blocks_per_request"])


def validate_throughput(record: Any) -> dict[str, Any]:
    """Check a ``ScoreCache.throughput`` record; return it, or raise ``ValueError``.

    Schema (written by the speed benchmark; the full, unpruned model)::

        {"tokens_per_s": 412.5,      # output tokens/s of the whole batch, decode
         "batch_size": 8,            # concurrent sequences it was measured at
         "max_tokens": 128,          # output tokens per sequence
         "device": "cpu",            # e.g. "cpu" or "cuda:NVIDIA H200"
         "dtype": "bfloat16",
         "vllm_version": "0.32.0",
         "measured_by": "benchmarks/bench_speed.py",
         "measured_at": "2026-11-29T10:00:00Z"}

    Only ``tokens_per_s`` (finite, > 0) and ``batch_size`` (int >= 1) are required.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"throughput record must be a dict, got {type(record).__name__}")
    rate = record.get("tokens_per_s")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not strict_json.is_finite(rate) or rate <= 0:
        raise ValueError(f"throughput tokens_per_s must be a finite number > 0, got {rate!r}")
    batch = record.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"throughput batch_size must be an integer >= 1, got {batch!r}")
    return dict(record)


@dataclass(frozen=True)
class Baseline:
    """The full model's throughput this server is compared with."""

    kind: str  # "measured" | "estimated"
    source: str  # "benchmark" | "latency-profile" | "predicted-speedup"
    tokens_per_s: float | None  # None for predicted-speedup: derived from the live rate
    batch_size: int | None = None


def choose_baseline(throughput: Any = None, profile: Any = None) -> Baseline:
    """Measured benchmark record first, then the measured per-block profile, else the
    predicted speed-up (only a ratio: no absolute full-model rate is known)."""
    if throughput is not None:
        try:
            record = validate_throughput(throughput)
            return Baseline("measured", "benchmark", float(record["tokens_per_s"]), record["batch_size"])
        except ValueError as err:
            logger.warning("miprun metrics: ignoring the cached throughput record: %s", err)
    if profile is not None:
        try:
            model = LatencyModel.from_profile(profile)
            if model.full_s > 0:
                return Baseline("estimated", "latency-profile", model.batch_size / model.full_s, model.batch_size)
        except ValueError as err:
            logger.warning("miprun metrics: ignoring the cached latency profile: %s", err)
    return Baseline("estimated", "predicted-speedup", None)


def throughput_gain(rate: float, baseline: Baseline, predicted_speedup: float | None) -> tuple[float, float]:
    """(baseline tokens/s, gain) for a live ``rate``; NaNs when nothing ran."""
    if baseline.tokens_per_s is not None:
        gain = rate / baseline.tokens_per_s if rate > 0 else math.nan
        return baseline.tokens_per_s, gain
    speedup = predicted_speedup if predicted_speedup and predicted_speedup > 0 else math.nan
    if rate <= 0 or math.isnan(speedup):
        return math.nan, math.nan
    return rate / speedup, speedup


class ThroughputWindow:
    """Output tokens per busy second over a sliding window, from engine-step events.

    ``step(t, tokens, running_before)``: a step's outputs arrived at ``t`` with
    ``tokens`` new tokens; ``running_before`` says whether requests were running since
    the previous step. Only such steps count: the gap since the previous step is busy
    time and their tokens are decode output. The first step after an idle spell
    (prefill of a new burst) and the idle gap before it are left out.
    """

    def __init__(self, window_s: float = WINDOW_S):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        self.window_s = window_s
        self._events: deque[tuple[float, int, float]] = deque()  # (t, tokens, busy_s)
        self._last_t: float | None = None

    def step(self, t: float, tokens: int, running_before: bool) -> None:
        if self._last_t is not None and running_before and t > self._last_t:
            self._events.append((t, int(tokens), t - self._last_t))
        if self._last_t is None or t > self._last_t:
            self._last_t = t

    def rate(self, now: float) -> float:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        busy = sum(e[2] for e in self._events)
        return sum(e[1] for e in self._events) / busy if busy > 0 else 0.0
