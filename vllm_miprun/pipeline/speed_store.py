"""The speed sidecar: a measured latency profile and throughput, kept per set of weights.

The profile depends on the weights and the machine, not on the calibration settings. It
is written to ``<cache_dir>/<model>-<fingerprint>.speed.json`` (:func:`speed_path`) and
into the ``profile``/``throughput`` fields of every score cache in ``cache_dir`` made for
the same weights (same fingerprint), through ``store.update_cache``. ``plan.latency_model``
uses the score cache's profile first; the sidecar covers plans made without a cache
(e.g. ``--method last``). Writers: ``vllm-miprun profile`` and the speed benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from filelock import FileLock

from vllm_miprun.core.latency import LatencyModel
from vllm_miprun.model.checkpoint import read_config
from vllm_miprun.model.fingerprint import model_fingerprint
from vllm_miprun.pipeline import store as score_cache

SPEED_FORMAT = "vllm-miprun-speed"
SPEED_FORMAT_VERSION = 1


def speed_path(model_dir: str | Path, cache_dir: str | Path | None = None,
               fingerprint: str | None = None) -> Path:
    """The speed sidecar for these weights: ``<cache_dir>/<model>-<fingerprint>.speed.json``."""
    fingerprint = fingerprint or model_fingerprint(model_dir)
    folder = score_cache.cache_folder(cache_dir)
    digest = fingerprint.split(":", 1)[-1][:16]
    return folder / f"{score_cache.safe_name(Path(model_dir).resolve().name)}-{digest}.speed.json"


def read_speed(model_dir: str | Path, cache_dir: str | Path | None = None,
               fingerprint: str | None = None) -> dict[str, Any] | None:
    """The speed sidecar's contents for these weights (``fingerprint`` when the caller
    knows it, e.g. from a hub alias), or None when there is none."""
    fingerprint = fingerprint or model_fingerprint(model_dir)
    path = speed_path(model_dir, cache_dir, fingerprint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: a deeply nested file
        return None
    if not isinstance(data, dict) or data.get("format") != SPEED_FORMAT or data.get("fingerprint") != fingerprint:
        return None
    return data


def read_profile(model_dir: str | Path, cache_dir: str | Path | None = None,
                 fingerprint: str | None = None) -> dict[str, Any] | None:
    """The measured profile from the sidecar (``LatencyModel.from_profile`` input), or None."""
    data = read_speed(model_dir, cache_dir, fingerprint)
    profile = data.get("profile") if data else None
    if not profile:
        return None
    try:
        LatencyModel.from_profile(profile)
    except ValueError:
        return None
    return profile


def _check_profile(profile: Mapping, num_blocks: Any) -> None:
    blocks = LatencyModel.from_profile(profile).num_blocks  # ValueError naming what is wrong
    if blocks != num_blocks:
        raise ValueError(f"latency profile gives {blocks} block costs, the model has {num_blocks} blocks; "
                         "re-run `vllm-miprun profile MODEL_DIR`")


def store_speed(model_dir: str | Path, cache_dir: str | Path | None = None, *,
                profile: Mapping | None = None, throughput: Mapping | None = None) -> list[str]:
    """Write ``profile`` and/or ``throughput`` to the sidecar and to every score cache of
    these weights in ``cache_dir``. Returns the paths written. A ``profile`` that is not a
    latency profile of this model raises ``ValueError`` before anything is written: stored
    in the score caches, it would make every one of them unreadable."""
    if profile is not None:
        _check_profile(profile, read_config(model_dir).get("num_hidden_layers"))
    fingerprint = model_fingerprint(model_dir)
    path = speed_path(model_dir, cache_dir, fingerprint)
    score_cache.ensure_writable(path.parent)
    written = []
    with FileLock(str(path) + ".lock", timeout=600):
        data = None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            pass
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            data = {"format": SPEED_FORMAT, "format_version": SPEED_FORMAT_VERSION,
                    "fingerprint": fingerprint, "model": Path(model_dir).resolve().name}
        if profile is not None:
            data["profile"] = dict(profile)
        if throughput is not None:
            data["throughput"] = dict(throughput)
        score_cache.atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))
    written.append(str(path))

    def update(cache):
        if profile is not None:
            cache.profile = dict(profile)
        if throughput is not None:
            cache.throughput = dict(throughput)

    for candidate in sorted(path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.json")):
        if candidate.name.endswith(".speed.json"):
            continue
        try:
            if score_cache.read_cache(candidate).fingerprint != fingerprint:
                continue
            score_cache.update_cache(candidate, update)
        except score_cache.CacheError:
            continue
        written.append(str(candidate))
    return written
