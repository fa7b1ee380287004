"""Plan and load reports, handed from the processes that know them to the API server.

``loader.record_report`` calls :func:`publish` (through ``vllm/metrics.py``) in the front
process (the plan) and in each worker (the load time). It writes the report as a small
JSON file into a per-run folder that the front process creates. The front names it in the
environment (``MIPRUN_RUN_DIR``), which the API-server processes it starts inherit, and in
the config every worker receives (``vllm/worker_paths.py``: a Ray actor does not inherit
the front's environment). The metrics exporter in the API server reads them back with
:func:`read_reports`. Plain Python: no vLLM import.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vllm_miprun.vllm.process_owner import owner_gone, owner_record

logger = logging.getLogger(f"vllm.{__name__}")

RUN_DIR_ENV = "MIPRUN_RUN_DIR"
RUN_DIR_PREFIX = "vllm-miprun-run-"
OWNER_FILE = "owner.json"  # the front process that made the folder (process_owner.owner_record)
PLAN_FILE = "plan.json"
LOAD_PREFIX = "load-"

_lock = threading.Lock()
_published: dict[str, dict[str, Any]] = {}  # "plan" / "load" -> last report in this process
# (pid, path) of every folder made here, removed at exit: a process whose folder was removed
# or unset under it makes another, and the first must not be left behind either.
_created_run_dirs: list[tuple[int, str]] = []


def run_dir(create: bool = False) -> Path | None:
    """This run's report folder (``$MIPRUN_RUN_DIR``); made and exported if asked."""
    value = os.environ.get(RUN_DIR_ENV)
    if value and Path(value).is_dir():
        return Path(value)
    if not create:
        return None
    try:  # housekeeping: it must never stop a start
        remove_orphaned_run_dirs(Path(tempfile.gettempdir()))
    except Exception as err:  # noqa: BLE001
        logger.debug("miprun metrics: left the old run folders alone: %s", err)
    path = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)
    _write_json(Path(path) / OWNER_FILE, owner_record())
    os.environ[RUN_DIR_ENV] = path  # inherited by every process started from here on
    if not _created_run_dirs:
        atexit.register(remove_own_run_dir)
    _created_run_dirs.append((os.getpid(), path))
    return Path(path)


def remove_orphaned_run_dirs(parent: Path) -> list[Path]:
    """Remove this user's run folders whose front process has surely ended; returns them.

    A front process removes its folder at exit, but not when it is SIGKILLed (or ends by
    ``os._exit``). A folder is judged only by its owner record (``process_owner``), read
    without following links or blocking, so nothing planted in a shared /tmp can hang or
    stop a start, and a folder whose owner cannot be told apart is left alone.
    """
    removed = []
    for folder in parent.glob(f"{RUN_DIR_PREFIX}*"):
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            owner = _read_small_json(folder / OWNER_FILE)
        except (OSError, ValueError, RecursionError):
            continue
        if owner_gone(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _read_small_json(path: Path, limit: int = 4096) -> Any:
    """A small JSON file, refused (OSError) when it is a link, a FIFO, a device or too long."""
    handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(handle, "rb") as file:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path} is longer than {limit} bytes")
    return json.loads(data)


def remove_own_run_dir() -> None:
    """Remove the run folders this process made (at exit; ``os._exit`` skips atexit, so
    ``engine_exit`` calls it itself). A forked child inherits the list, not the folders."""
    for pid, path in _created_run_dirs:
        if pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(temp, path)


def publish(report: dict[str, Any], folder: Path | None = None) -> None:
    """Hand a plan report (front process) or load report (worker) to the API server.

    Called by ``loader.record_report``. A report with ``load_seconds`` is a load report
    and goes to ``load-<pid>.json``; any other report is a plan and goes to
    ``plan.json``. ``folder`` is the run's folder when the caller knows it (a worker, from
    its config), else :func:`run_dir`'s. Never raises: metrics must not stop a model
    from loading.
    """
    kind = "load" if "load_seconds" in report else "plan"
    try:
        stamp = "loaded_at" if kind == "load" else "planned_at"
        data = {**report, stamp: time.time(), "pid": os.getpid()}
        with _lock:
            _published[kind] = data
        folder = folder if folder is not None else run_dir(create=kind == "plan")
        if folder is None:
            logger.debug("miprun metrics: no %s set; load report kept in-process only", RUN_DIR_ENV)
            return
        name = PLAN_FILE if kind == "plan" else f"{LOAD_PREFIX}{os.getpid()}.json"
        _write_json(folder / name, data)
    except Exception as err:  # noqa: BLE001 - metrics are best effort
        logger.warning("miprun metrics: could not publish the %s report: %s", kind, err)


def read_reports(kept: list[int]) -> tuple[dict[str, Any] | None, float | None]:
    """(plan report, load seconds) for the engine serving ``kept`` blocks, if known.

    The load time is the slowest worker's among load reports written after the plan.
    """
    plan, loads = None, []
    folder = run_dir()
    if folder is not None:
        plan = _read_json(folder / PLAN_FILE)
        loads = [_read_json(p) for p in folder.glob(f"{LOAD_PREFIX}*.json")]
    with _lock:
        plan = plan or _published.get("plan")
        loads.append(_published.get("load"))
    if plan is not None and list(plan.get("kept", [])) != list(kept):
        plan = None
    since = plan.get("planned_at", 0.0) if plan else 0.0
    seconds = [float(r["load_seconds"]) for r in loads
               if r and list(r.get("kept", [])) == list(kept) and r.get("loaded_at", 0.0) >= since]
    return plan, (max(seconds) if seconds else None)


def read_kv_layouts(kept: list[int]) -> dict[str, Any] | None:
    """The KV layouts (pruned, full) a worker serving ``kept`` blocks reported, if any."""
    plan, _ = read_reports(kept)
    since = plan.get("planned_at", 0.0) if plan else 0.0
    folder = run_dir()
    loads = [_read_json(p) for p in folder.glob(f"{LOAD_PREFIX}*.json")] if folder is not None else []
    with _lock:
        loads.append(_published.get("load"))
    loads = [r for r in loads if r and list(r.get("kept", [])) == list(kept) and r.get("kv_layouts")
             and r.get("loaded_at", 0.0) >= since]
    return max(loads, key=lambda r: r["loaded_at"])["kv_layouts"] if loads else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
