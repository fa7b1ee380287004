"""Fit a measured latency profile: ``latency(K) = fixed_s + K * block_s``.

Pure maths for ``vllm-miprun profile`` and the speed benchmark: the timings come in as
``(kept blocks, seconds per output token)`` points, the result is the profile dict that
:meth:`vllm_miprun.core.latency.LatencyModel.from_profile` reads. Every block is taken to
cost the same (decoder blocks share one shape), so ``block_s`` is one value repeated L
times. A fit that comes out negative (noise) is clamped: a negative ``fixed_s`` refits
through the origin, a negative slope keeps ``block_s = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from vllm_miprun.core.latency import LatencyModel


def fit_fixed_and_block(points: Iterable[tuple[int, float]]) -> dict[str, Any]:
    """Least-squares ``seconds = fixed_s + K * block_s`` over ``(K, seconds)`` points.

    Needs at least two distinct K. Returns ``fixed_s``, ``block_s``, the RMS residual
    and ``clamped`` (which constraint, if any, was applied to keep both costs >= 0).
    """
    pts = [(int(k), float(s)) for k, s in points]
    if any(k < 0 or not math.isfinite(s) or s < 0 for k, s in pts):
        raise ValueError(f"points must be (blocks >= 0, seconds >= 0), got {pts}")
    ks = sorted({k for k, _ in pts})
    if len(ks) < 2:
        raise ValueError(
            f"fitting fixed and per-block cost needs two or more distinct block counts, got {ks}; "
            "measure at least two keep ratios (e.g. 1.0 and 0.5)"
        )
    n = len(pts)
    mean_k = sum(k for k, _ in pts) / n
    mean_s = sum(s for _, s in pts) / n
    sxx = sum((k - mean_k) ** 2 for k, _ in pts)
    sxy = sum((k - mean_k) * (s - mean_s) for k, s in pts)
    block = sxy / sxx
    fixed = mean_s - block * mean_k
    clamped = None
    if block < 0:
        block, fixed, clamped = 0.0, mean_s, "block_s<0: set to 0"
    elif fixed < 0:
        block = sum(k * s for k, s in pts) / sum(k * k for k, _ in pts)
        fixed, clamped = 0.0, "fixed_s<0: refit through the origin"
    residual = math.sqrt(sum((s - fixed - block * k) ** 2 for k, s in pts) / n)
    return {"fixed_s": fixed, "block_s": block, "residual_rms_s": residual, "clamped": clamped}


def make_profile(num_blocks: int, batch_size: int, points: Sequence[tuple[int, float]],
                 measured: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored profile: fit ``points`` and repeat the per-block cost ``num_blocks`` times."""
    fit = fit_fixed_and_block(points)
    profile = {
        "batch_size": int(batch_size),
        "fixed_s": fit["fixed_s"],
        "block_s": [fit["block_s"]] * int(num_blocks),
        "source": "profile",
        "measured": {
            **dict(measured or {}),
            "points": [{"kept": int(k), "s_per_token": float(s)} for k, s in points],
            "fit": "latency = fixed_s + K * block_s (least squares, homogeneous blocks)",
            "residual_rms_s": fit["residual_rms_s"],
            "clamped": fit["clamped"],
        },
    }
    LatencyModel.from_profile(profile)  # validates the shape the planner will read
    return profile


def profile_problem(profile: Mapping[str, Any]) -> str | None:
    """Why a fitted profile should not be stored, or None when it is usable.

    A per-block cost of zero (latency did not grow with the block count) means the
    measurements were noise: a planner given it would predict no speed-up at all.
    """
    if not profile["block_s"] or max(profile["block_s"]) <= 0:
        points = ", ".join(f"{p['kept']} blocks: {p['s_per_token'] * 1e3:.2f} ms"
                           for p in profile.get("measured", {}).get("points", []))
        return (f"decode latency did not grow with the number of blocks ({points}); the timings are "
                "noise (a busy machine?): rerun on an idle machine, with more --output-tokens or --repeats")
    return None


def decode_seconds_per_token(t_full: float, t_first: float, output_tokens: int) -> float:
    """Time per output token after the first: ``(T_N - T_1) / (N - 1)``."""
    if output_tokens < 2:
        raise ValueError(f"decode time needs at least 2 output tokens, got {output_tokens}")
    return max(0.0, (t_full - t_first) / (output_tokens - 1))
