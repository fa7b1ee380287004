"""The score cache: one self-describing JSON file per (weights, calibration settings).

JSON only, never pickle. A file records the format and code versions, the model
fingerprint, the calibration settings and estimator, every score, and timings. The file
name is a sanitised model name plus a hash of fingerprint and settings: it is only a
lookup key, and the contents are checked again on every read, so a renamed or copied
file is never trusted for other weights or other settings.

The same folder holds the speed sidecars (``speed_store.py``) and the hub aliases
(``hub_alias.py``: a hub commit -> its weights' fingerprint, so a snapshot fetched in
part finds its cache).

Writes are atomic (temporary file, fsync, rename, fsync of the folder) under a file lock,
so an interrupted or concurrent calibration never leaves a partial file behind. Every file
of the folder (caches, sidecars, heal maps) is written by :func:`atomic_write_bytes`. A
writer killed inside its write window leaves its temporary file; the next process that
uses the folder removes it (:func:`sweep_stale_temps`), never one a live writer holds.

Version policy. ``format_version`` says what a plan reads from the file and how; it is
bumped whenever that changes, so a cache of this format gives the same plan whatever
``code_version`` (the writer's vllm-miprun, kept for provenance) wrote it. A file is
refused in one line, never read differently, when its ``format_version`` is not the
integer this code reads (older, newer, or not an integer), when ``code_version`` is not a
version string, when any field a plan reads is missing (``baselines.skip_mi_iso`` included:
without it mi-prun would rank with another cost), or when any number is not finite.
Refusal, not recomputation: the file may be the user's explicit ``scores``, and a load
with ``require_cache`` must not calibrate; the message says how to recalibrate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from vllm_miprun import __version__, envs, strict_json
from vllm_miprun.core.latency import LatencyModel
from vllm_miprun.errors import CacheError  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

FORMAT = "vllm-miprun-scores"
FORMAT_VERSION = 1
# Temporary names of this module's writes (mkstemp: ".NAME.<8 chars>.tmp") and probes.
TEMP_NAME = re.compile(r"^\.(.+\.[A-Za-z0-9_]{8}\.tmp|probe-[A-Za-z0-9_]{8})$")
# A temp file younger than this is left alone even when unlocked: its writer may sit
# between mkstemp and taking the lock (microseconds), or be a probe still in use.
STALE_TEMP_SECONDS = 1.0
# A cache of a 1,000-block model is about 100 MB; a larger file is not one of ours.
MAX_CACHE_BYTES = 1 << 30
_swept: set[Path] = set()


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
            timings=data.get("timings") or {},
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
    """Where score caches and their sidecars go: ``cache_dir``, else ``MIPRUN_CACHE_DIR``.
    The first call of a process for a folder removes the debris of killed writers there."""
    folder = Path(cache_dir).expanduser() if cache_dir else envs.cache_dir()
    if folder not in _swept:
        _swept.add(folder)
        sweep_stale_temps(folder)
    return folder


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove this module's temporary files in ``folder`` whose writer is gone: the name is
    ours, no process holds its lock (a live writer does until its rename), and it is older
    than ``STALE_TEMP_SECONDS``. Returns what was removed; other files are never touched."""
    removed = []
    try:
        entries = [p for p in folder.iterdir() if TEMP_NAME.match(p.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            handle = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # renamed or removed meanwhile, or not ours to open
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(handle).st_mtime >= STALE_TEMP_SECONDS:
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass  # locked: a live writer's
        finally:
            os.close(handle)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writers in %s: %s",
                    len(removed), folder, [p.name for p in removed])
    return removed


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
        _check_regular_file(path, path.stat())
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheError(f"score cache {path} does not exist; create it with `vllm-miprun calibrate MODEL_DIR`") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CacheError(f"score cache {path} cannot be read ({err}); delete it and recalibrate") from None
    try:  # NaN and Infinity parse, so the shape check refuses them with the field's name
        data = strict_json.loads(text, parse_constant=float)
    except (ValueError, RecursionError) as err:
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


def _check_regular_file(path: Path, info: os.stat_result) -> None:
    """Refuse, before opening it, what would hang the read (a FIFO) or never end (a device)."""
    what = strict_json.unreadable_reason(info, MAX_CACHE_BYTES)
    if what:
        raise CacheError(f"score cache {path} is {what}; expected a score cache file of at most "
                         f"{MAX_CACHE_BYTES >> 20} MiB written by `vllm-miprun calibrate`; point to one")


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
    """:func:`atomic_write_bytes` of ``payload`` as UTF-8."""
    atomic_write_bytes(path, payload.encode("utf-8"))


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, so a
    reader sees the old file or the new one, never half of it; ``CacheError`` on failure.

    The temp file is locked until the rename: a killed writer's lock goes with it, which
    tells :func:`sweep_stale_temps` the file is debris. The folder is fsynced after the
    rename, so the new name survives a power cut too."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), 0o644)
            _pause_inside_write_window(temp)
            os.replace(temp, path)  # before the close: the lock covers the whole window
        _fsync_folder(path.parent)
    except OSError as err:
        Path(temp).unlink(missing_ok=True)
        raise CacheError(
            f"could not write {path} ({err.strerror or err}); free disk space or set "
            "--cache-dir / MIPRUN_CACHE_DIR to another folder"
        ) from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _pause_inside_write_window(temp: str) -> None:
    """Test hook (``MIPRUN_TEST_WRITE_PAUSE``, see ``envs``): name the written, fsynced temp
    file in the hook's file, then wait before the rename, so a test can kill the writer
    inside its write window."""
    marker = envs.write_pause_hook()
    if marker is not None:
        marker.write_text(temp)
        time.sleep(600)


def _check_shape(data: Any, source: str) -> None:
    def bad(why: str) -> CacheError:
        return CacheError(f"score cache {source} has the wrong shape: {why}; delete it and recalibrate")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"expected a JSON object with format={FORMAT!r}")
    _check_versions(data, source, bad)
    _check_all_finite(data, "", bad)
    for key, kind in (("fingerprint", str), ("model", dict), ("calibration", dict), ("estimator", dict),
                      ("block_scores", list), ("span_scores", list), ("baselines", dict)):
        if not isinstance(data.get(key), kind):
            raise bad(f"{key!r} must be a {kind.__name__}")
    for key in ("timings", "selections", "profile", "throughput"):  # optional: absent or null is none
        if not isinstance(data.get(key, {}), (dict, type(None))):
            raise bad(f"{key!r} must be an object or null")
    _check_fields_read_later(data, bad)
    if "skip_mi_iso" not in data["baselines"]:
        raise CacheError(
            f"score cache {source} was written by vllm-miprun {data['code_version']} without "
            "baselines.skip_mi_iso, which this version ranks spans with; recalibrate with "
            "`vllm-miprun calibrate MODEL_DIR --force` (same settings)"
        )
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
    _check_square(data["baselines"]["skip_mi_iso"], count + 1, "baselines.skip_mi_iso", bad, upper_only=True)
    for method, by_count in (data.get("selections") or {}).items():
        if not isinstance(by_count, dict):
            raise bad(f"selections.{method} must be an object of block lists")
        for num_prune, pruned in by_count.items():
            if (not isinstance(pruned, list) or str(len(pruned)) != num_prune
                    or not all(type(b) is int and 0 <= b < count for b in pruned) or len(set(pruned)) != len(pruned)):
                raise bad(f"selections.{method}.{num_prune} must list {num_prune} distinct blocks in 0..{count - 1}")
    quality = data.get("quality") or {}
    if not isinstance(quality, dict) or not all(isinstance(by_set, dict) for by_set in quality.values()):
        raise bad("quality must map a validation setup to {pruned blocks: mean NLL}")
    for setup, by_set in quality.items():
        _check_finite(list(by_set.values()), f"quality.{setup}", bad)


def _check_fields_read_later(data: dict, bad) -> None:
    """What planning and ``vllm-miprun scores`` read besides the scores: the hidden size,
    the measured latency profile and the timings."""
    hidden = data["model"].get("hidden_size")
    if hidden is not None and (type(hidden) is not int or hidden < 1):
        raise bad(f"model.hidden_size must be a positive integer or null, got {hidden!r:.40}")
    timings = data.get("timings") or {}
    _check_finite(list(timings.values()), "timings", bad)
    if data.get("profile"):
        try:
            profile = LatencyModel.from_profile(data["profile"])
        except ValueError as err:
            raise bad(f"profile is not a latency profile ({err})") from None
        if profile.num_blocks != len(data["block_scores"]):
            raise bad(f"profile.block_s must list {len(data['block_scores'])} costs, one per block, "
                      f"got {profile.num_blocks}")


def _check_versions(data: dict, source: str, bad) -> None:
    """The version policy of the module docstring."""
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CacheError(
            f"score cache {source} has format version {version}, newer than this vllm-miprun "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade vllm-miprun or recalibrate"
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise bad(f"format_version must be the integer {FORMAT_VERSION}, got {version!r}")
    code = data.get("code_version")
    if not isinstance(code, str) or not re.fullmatch(r"[0-9][0-9A-Za-z.+_-]{0,63}", code):
        raise bad(f"code_version must be the version string of the vllm-miprun that wrote it, got {code!r:.80}")


def _check_all_finite(value: Any, where: str, bad) -> None:
    """No NaN, Infinity or overflowing number anywhere in the file (timings included)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_all_finite(item, f"{where}.{key}" if where else key, bad)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_all_finite(item, f"{where}[{index}]", bad)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not strict_json.is_finite(value):
        raise bad(f"{where} holds {value!r:.40}; every number must be finite")


def _check_finite(values: list, where: str, bad) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not strict_json.is_finite(value):
            raise bad(f"{where} holds {value!r:.40}; every score must be a finite number")


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
