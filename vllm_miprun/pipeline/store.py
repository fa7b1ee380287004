"""The score cache: one self-describing JSON file per (weights, calibration settings).

JSON only, never pickle. A file records the format and code versions, the model
fingerprint, the calibration settings and estimator, every score, and timings. The file
name is a sanitised model name plus a hash of fingerprint and settings: it is only a
lookup key, and the contents are checked again on every read, so a renamed or copied
file is never trusted for other weights or other settings.

The same folder holds the speed sidecars (``speed_store.py``) and the hub aliases
(``hub_alias.py``: a hub commit -> its weights' fingerprint, so a snapshot fetched in
part finds its cache).

Writes are atomic (temporary file, fsync, rename) under a file lock, so an interrupted
or concurrent calibration never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from vllm_miprun import __version__, envs
from vllm_miprun.errors import CacheError  # noqa: F401 - re-exported

FORMAT = "vllm-miprun-scores"
FORMAT_VERSION = 1


@dataclass
class ScoreCache:
    """Scores of one model under one calibration setting (see the module docstring)."""

    fingerprint: str
    model: dict[str, Any]
    calibration: dict[str, Any]
    estimator: dict[str, Any]
    block_scores: list[float]
    span_scores: list[list[float | None]]
    baselines: dict[str, Any]
    timings: dict[str, float]
    selections: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    throughput: dict[str, Any] | None = None
    # validation setup (pipeline.quality) -> pruned blocks "3,5" ("" = dense) -> mean NLL, nats
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    code_version: str = __version__

    @property
    def num_blocks(self) -> int:
        return len(self.block_scores)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "code_version": self.code_version,
            "num_blocks": self.num_blocks,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "calibration": self.calibration,
            "estimator": self.estimator,
            "block_scores": self.block_scores,
            "span_scores": self.span_scores,
            "baselines": self.baselines,
            "selections": self.selections,
            "profile": self.profile,
            "throughput": self.throughput,
            "quality": self.quality,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "cache") -> "ScoreCache":
        _check_shape(data, source)
        return cls(
            fingerprint=data["fingerprint"],
            model=data["model"],
            calibration=data["calibration"],
            estimator=data["estimator"],
            block_scores=data["block_scores"],
            span_scores=data["span_scores"],
            baselines=data["baselines"],
            timings=data.get("timings", {}),
            selections=data.get("selections") or {},
            profile=data.get("profile"),
            throughput=data.get("throughput"),
            quality=data.get("quality") or {},
            format_version=data["format_version"],
            code_version=data.get("code_version", "unknown"),
        )


def cache_key(fingerprint: str, calibration: dict[str, Any]) -> str:
    payload = json.dumps({"fingerprint": fingerprint, "calibration": calibration}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    """A file-name-safe slug: no separators, no leading dots, bounded length."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-")[:64]
    return slug or "model"


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """Where score caches and their sidecars go: ``cache_dir``, else ``MIPRUN_CACHE_DIR``."""
    return Path(cache_dir).expanduser() if cache_dir else envs.cache_dir()


def cache_path(model_dir: str | Path, fingerprint: str, calibration: dict[str, Any],
               cache_dir: str | Path | None = None) -> Path:
    folder = cache_folder(cache_dir)
    name = f"{safe_name(Path(model_dir).resolve().name)}-{cache_key(fingerprint, calibration)}.json"
    return folder / name


def read_cache(path: str | Path, fingerprint: str | None = None,
               calibration: dict[str, Any] | None = None) -> ScoreCache:
    """Read and validate a cache; with ``fingerprint``/``calibration``, also check they match."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheError(f"score cache {path} does not exist; create it with `vllm-miprun calibrate MODEL_DIR`") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CacheError(f"score cache {path} cannot be read ({err}); delete it and recalibrate") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:
        raise CacheError(
            f"score cache {path} is corrupt: not valid JSON ({err}); delete it and run "
            "`vllm-miprun calibrate` again"
        ) from None
    cache = ScoreCache.from_json(data, source=str(path))
    if fingerprint is not None and cache.fingerprint != fingerprint:
        raise CacheError(
            f"score cache {path} belongs to other weights (fingerprint {cache.fingerprint[:19]}..., "
            f"model has {fingerprint[:19]}...); recalibrate this model or point to its own cache"
        )
    if calibration is not None and cache.calibration != calibration:
        raise CacheError(
            f"score cache {path} was made with calibration settings {cache.calibration}, "
            f"not {calibration}; recalibrate with these settings or pass the matching ones"
        )
    return cache


# How long a process waits for another one's calibration or forward search.
COMPUTE_LOCK_SECONDS = 6 * 3600


def write_cache(path: str | Path, cache: ScoreCache) -> Path:
    """Atomically write ``cache`` to ``path`` (temp file + fsync + rename) under a lock."""
    path = Path(path)
    ensure_writable(path.parent)
    payload = json.dumps(cache.to_json(), indent=1, allow_nan=False)
    with FileLock(str(path) + ".lock", timeout=600):
        atomic_write_text(path, payload)
    return path


def compute_lock(path: str | Path) -> FileLock:
    """Held while the scores (or a search's answer) for ``path`` are computed, so processes
    that plan the same model at once (torchrun ranks, tensor-parallel workers) compute once
    and the others then read the cache. Another file than ``write_cache``'s lock, which is
    taken inside it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".compute.lock", timeout=COMPUTE_LOCK_SECONDS)


def update_cache(path: str | Path, update) -> ScoreCache:
    """Read-modify-write under the lock, so concurrent updates (e.g. SLEB results) merge."""
    path = Path(path)
    with FileLock(str(path) + ".lock", timeout=600):
        cache = read_cache(path)
        update(cache)
        atomic_write_text(path, json.dumps(cache.to_json(), indent=1, allow_nan=False))
    return cache


def ensure_writable(folder: Path) -> None:
    """Fail before any expensive work if the cache folder cannot take a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True):
            pass
    except OSError as err:
        raise CacheError(
            f"cannot write score caches to {folder} ({err.strerror or err}); set --cache-dir or "
            "MIPRUN_CACHE_DIR to a writable folder"
        ) from None


def atomic_write_text(path: Path, payload: str) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, so a
    reader sees the old file or the new one, never half of it; ``CacheError`` on failure."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as err:
        Path(temp).unlink(missing_ok=True)
        raise CacheError(
            f"could not write score cache {path} ({err.strerror or err}); free disk space or set "
            "--cache-dir / MIPRUN_CACHE_DIR to another folder"
        ) from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a score cache")


def _check_shape(data: Any, source: str) -> None:
    def bad(why: str) -> CacheError:
        return CacheError(f"score cache {source} has the wrong shape: {why}; delete it and recalibrate")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"expected a JSON object with format={FORMAT!r}")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise bad("format_version is missing")
    if version > FORMAT_VERSION:
        raise CacheError(
            f"score cache {source} has format version {version}, newer than this vllm-miprun "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade vllm-miprun or recalibrate"
        )
    for key, kind in (("fingerprint", str), ("model", dict), ("calibration", dict), ("estimator", dict),
                      ("block_scores", list), ("span_scores", list), ("baselines", dict)):
        if not isinstance(data.get(key), kind):
            raise bad(f"{key!r} must be a {kind.__name__}")
    blocks = data["block_scores"]
    count = len(blocks)
    if count < 1 or data.get("num_blocks", count) != count:
        raise bad(f"num_blocks={data.get('num_blocks')} but {count} block scores")
    _check_finite(blocks, "block_scores", bad)
    _check_square(data["span_scores"], count + 1, "span_scores", bad, upper_only=True)
    influence = data["baselines"].get("block_influence")
    if not isinstance(influence, list) or len(influence) != count:
        raise bad(f"baselines.block_influence must list {count} numbers")
    _check_finite(influence, "baselines.block_influence", bad)
    _check_square(data["baselines"].get("angular"), count + 1, "baselines.angular", bad, upper_only=True)
    if "skip_mi_iso" in data["baselines"]:
        _check_square(data["baselines"]["skip_mi_iso"], count + 1, "baselines.skip_mi_iso", bad, upper_only=True)
    for method, by_count in (data.get("selections") or {}).items():
        for num_prune, pruned in by_count.items():
            if (not isinstance(pruned, list) or len(set(pruned)) != len(pruned) or str(len(pruned)) != num_prune
                    or not all(isinstance(b, int) and 0 <= b < count for b in pruned)):
                raise bad(f"selections.{method}.{num_prune} must list {num_prune} distinct blocks in 0..{count - 1}")
    quality = data.get("quality") or {}
    if not isinstance(quality, dict) or not all(isinstance(by_set, dict) for by_set in quality.values()):
        raise bad("quality must map a validation setup to {pruned blocks: mean NLL}")
    for setup, by_set in quality.items():
        _check_finite(list(by_set.values()), f"quality.{setup}", bad)


def _check_finite(values: list, where: str, bad) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"{where} holds {value!r}; every score must be a finite number")


def _check_square(matrix: Any, size: int, where: str, bad, upper_only: bool) -> None:
    if not isinstance(matrix, list) or len(matrix) != size or any(
        not isinstance(row, list) or len(row) != size for row in matrix
    ):
        raise bad(f"{where} must be a {size}x{size} list of lists")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if i < j:
                _check_finite([value], f"{where}[{i}][{j}]", bad)
            elif value is not None and upper_only:
                raise bad(f"{where}[{i}][{j}] must be null (only i < j is scored)")
