"""Prometheus metrics for what pruning gained, on vLLM's own ``/metrics`` endpoint.

Three kinds of process each know part of the story:

* the **front process** (the one that runs ``EngineArgs.from_cli_args``: the API
  server, or the launcher of several API servers) makes the plan;
* the **worker** (the engine core on one CPU/GPU, or each tensor-parallel worker)
  loads the weights and times it;
* the **API server** serves ``/metrics`` and, through the ``vllm.stat_logger_plugins``
  entry point (:class:`MiprunStatLogger`), sees every engine step.

``loader.record_report`` calls :func:`publish` in the first two. It writes the report as
a small JSON file into a per-run folder that the front process creates and names in
the environment (``MIPRUN_RUN_DIR``), which every engine, worker and API-server process
it starts inherits. The stat logger in the API server reads those files once the engine
is up (vLLM builds stat loggers after the engine core reported ready, so the load is
over), and sets ordinary ``prometheus_client`` gauges. A gauge set in the API-server
process shows on ``/metrics`` both without ``PROMETHEUS_MULTIPROC_DIR`` (the global
registry) and with it (``multiprocess_mode="mostrecent"`` writes the value to the
shared folder that vLLM's ``MultiProcessCollector`` reads), so one code path serves
both modes.

Everything above the stat-logger class is plain Python with no vLLM import.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(f"vllm.{__name__}")

RUN_DIR_ENV = "MIPRUN_RUN_DIR"
PLAN_FILE = "plan.json"
LOAD_PREFIX = "load-"
WINDOW_S = 60.0  # sliding window of miprun_generation_tokens_per_second
UPDATE_EVERY_S = 0.5  # at most this often from the per-step hook (plus at every idle step)

# name -> (HELP text, labels besides model_name). The README's metric table matches this.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "miprun_blocks_total": (
        "Decoder blocks in the full model (L).", ()),
    "miprun_blocks_kept": (
        "Decoder blocks built and served after pruning (K).", ()),
    "miprun_keep_ratio": (
        "Kept blocks over all blocks, K/L.", ()),
    "miprun_weight_bytes_saved": (
        "Bytes of the pruned blocks' tensors as stored in the checkpoint (safetensors "
        "headers); never read and never allocated.", ()),
    "miprun_kv_cache_bytes_per_token_saved": (
        "KV-cache bytes per token not allocated because the pruned blocks have no "
        "attention layer: (L-K) x 2 x kv_heads x head_dim x KV dtype bytes.", ()),
    "miprun_kv_capacity_ratio": (
        "KV-cache tokens that fit in the same KV memory, pruned over full: L/K.", ()),
    "miprun_predicted_speedup": (
        "Per-output-token decode speed-up of the kept blocks predicted by the latency "
        "model (label latency_source: profile = measured per-block profile, "
        "flop-byte-estimate = FLOP and byte estimate).", ("latency_source",)),
    "miprun_plan_seconds": (
        "Seconds spent choosing the blocks in the front process, including calibration "
        "when the scores were computed.", ()),
    "miprun_load_seconds": (
        "Seconds the miprun loader spent in the worker: building the K-block model, "
        "reading the kept tensors, and vLLM's post-load processing (slowest worker). "
        "Excludes planning, process start, KV-cache allocation and warm-up.", ()),
    "miprun_scores_source": (
        "Always 1; label source says where the block scores came from: cache-hit, "
        "computed (calibrated at start) or none-needed (score-free method).",
        ("source", "method")),
    "miprun_generation_tokens_per_second": (
        "Output tokens per second while requests were running, over the last 60 s: "
        "tokens of decode steps / seconds between consecutive steps with running "
        "requests. 0 when nothing ran in the window.", ()),
    "miprun_throughput_baseline_tokens_per_second": (
        "The full model's output tokens per second this server is compared with. "
        "baseline=measured, source=benchmark: recorded in the score cache by the speed "
        "benchmark. baseline=estimated, source=latency-profile: batch_size / the full "
        "model's per-step latency from the measured per-block profile. "
        "baseline=estimated, source=predicted-speedup: this server's rate / "
        "predicted speed-up.", ("baseline", "source")),
    "miprun_throughput_gain": (
        "miprun_generation_tokens_per_second / miprun_throughput_baseline_tokens_per_second. "
        "With baseline=estimated, source=predicted-speedup it equals the predicted "
        "speed-up and is not a measurement. NaN when nothing ran in the window. "
        "Meaningful when the server runs at the baseline's batch size.", ("baseline",)),
}


# --- pure computations -----------------------------------------------------------------

def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a (possibly multimodal) Hugging Face config dict."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) and "num_hidden_layers" in inner else config


def kv_bytes_per_token_per_block(config: Mapping[str, Any], dtype_bytes: int) -> int:
    """KV-cache bytes one decoder block stores per token.

    Standard attention stores K and V: ``2 * kv_heads * head_dim * dtype_bytes``.
    Multi-head latent attention (DeepSeek: ``kv_lora_rank``) stores one latent vector
    plus the rope key: ``(kv_lora_rank + qk_rope_head_dim) * dtype_bytes``.
    """
    cfg = text_config(config)
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes!r}")
    if cfg.get("kv_lora_rank"):
        return (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)) * dtype_bytes
    heads = cfg.get("num_attention_heads")
    if not heads:
        raise ValueError("config has no num_attention_heads; cannot size the KV cache")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * int(kv_heads) * int(head_dim) * dtype_bytes


def kv_bytes_per_token_saved(config: Mapping[str, Any], num_pruned: int, dtype_bytes: int) -> int:
    return num_pruned * kv_bytes_per_token_per_block(config, dtype_bytes)


def pruned_weight_bytes(files: Iterable[str | Path], pruned: Iterable[int]) -> int:
    """Stored bytes of the ``model.layers.N.`` tensors of ``pruned`` blocks (headers only)."""
    from vllm_miprun.model.remap import layer_index
    from vllm_miprun.model.weights import read_header

    pruned = set(pruned)
    total = 0
    for path in files:
        for name, info in read_header(Path(path)).items():
            if layer_index(name) in pruned:
                start, end = info["data_offsets"]
                total += end - start
    return total


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
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
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
        from vllm_miprun.core.latency import LatencyModel

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


# --- publishing from the front process and the worker -----------------------------------

_lock = threading.Lock()
_published: dict[str, dict[str, Any]] = {}  # "plan" / "load" -> last report in this process
_created_run_dir: tuple[int, str] | None = None  # (pid, path) made here, removed at exit


def run_dir(create: bool = False) -> Path | None:
    """This run's report folder (``$MIPRUN_RUN_DIR``); made and exported if asked."""
    global _created_run_dir
    value = os.environ.get(RUN_DIR_ENV)
    if value and Path(value).is_dir():
        return Path(value)
    if not create:
        return None
    path = tempfile.mkdtemp(prefix="vllm-miprun-run-")
    os.environ[RUN_DIR_ENV] = path  # inherited by every process started from here on
    _created_run_dir = (os.getpid(), path)
    atexit.register(_remove_run_dir)
    return Path(path)


def _remove_run_dir() -> None:
    if _created_run_dir is not None and _created_run_dir[0] == os.getpid():
        shutil.rmtree(_created_run_dir[1], ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(temp, path)


def publish(report: dict[str, Any]) -> None:
    """Hand a plan report (front process) or load report (worker) to the API server.

    Called by ``loader.record_report``. A report with ``load_seconds`` is a load report
    and goes to ``load-<pid>.json``; any other report is a plan and goes to
    ``plan.json``. Never raises: metrics must not stop a model from loading.
    """
    try:
        kind = "load" if "load_seconds" in report else "plan"
        stamp = "loaded_at" if kind == "load" else "planned_at"
        data = {**report, stamp: time.time(), "pid": os.getpid()}
        with _lock:
            _published[kind] = data
        folder = run_dir(create=kind == "plan")
        if folder is None:
            logger.debug("miprun metrics: no %s set; load report kept in-process only", RUN_DIR_ENV)
            return
        name = PLAN_FILE if kind == "plan" else f"{LOAD_PREFIX}{os.getpid()}.json"
        _write_json(folder / name, data)
    except Exception as err:  # noqa: BLE001 - metrics are best effort
        logger.warning("miprun metrics: could not publish the %s report: %s", report.keys(), err)


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- the exporter in the API-server process ------------------------------------------------

_gauges: dict[str, Any] = {}


def gauges() -> dict[str, Any]:
    """The miprun gauges of this process, created once (global registry)."""
    from prometheus_client import Gauge

    with _lock:
        if not _gauges:
            for name, (help_text, labels) in METRICS.items():
                _gauges[name] = Gauge(name, help_text, labelnames=("model_name", *labels),
                                      multiprocess_mode="mostrecent")
        return _gauges


def find_cached_baseline(model_dir: Path, plan: Mapping[str, Any] | None,
                         cache_dir: str | Path | None) -> Baseline:
    """The baseline from the plan's score cache, else from any cache of these weights."""
    from vllm_miprun.pipeline import store as score_cache
    from vllm_miprun import envs

    candidates: list[Path] = []
    if plan and plan.get("cache_path"):
        candidates.append(Path(plan["cache_path"]))
    folder = Path(cache_dir).expanduser() if cache_dir else envs.cache_dir()
    if folder.is_dir():
        pattern = f"{score_cache.safe_name(model_dir.resolve().name)}-*.json"
        candidates += sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    fingerprint = None
    profile = None
    for path in candidates:
        if not path.is_file():
            continue
        if fingerprint is None:
            from vllm_miprun.model.fingerprint import model_fingerprint

            fingerprint = model_fingerprint(model_dir)
        try:
            cache = score_cache.read_cache(path, fingerprint=fingerprint)
        except score_cache.CacheError:
            continue
        if cache.throughput is not None:
            return choose_baseline(cache.throughput, None)
        profile = profile or cache.profile
    return choose_baseline(None, profile)


class Exporter:
    """Sets the miprun gauges for one served model; knows nothing about vLLM."""

    def __init__(self, model_name: str, model_dir: Path, config: Mapping[str, Any], kept: list[int],
                 num_blocks: int, kv_dtype_bytes: int, cache_dir: str | None = None,
                 window_s: float = WINDOW_S):
        self.model_name = model_name
        self.model_dir = Path(model_dir)
        self.config = config
        self.kept = list(kept)
        self.num_blocks = num_blocks
        self.kv_dtype_bytes = kv_dtype_bytes
        self.cache_dir = cache_dir
        self.windows: dict[int, ThroughputWindow] = {}
        self.running: dict[int, bool] = {}
        self.window_s = window_s
        self.plan: dict[str, Any] | None = None
        self.load_seconds: float | None = None
        self.baseline = Baseline("estimated", "predicted-speedup", None)
        self._last_update = 0.0

    @property
    def predicted_speedup(self) -> float | None:
        return self.plan.get("predicted_speedup") if self.plan else None

    def _set(self, name: str, value: float, **labels: str) -> None:
        gauges()[name].labels(model_name=self.model_name, **labels).set(value)

    def publish_static(self) -> None:
        """The plan, memory and load gauges (once the engine is up)."""
        self.plan, self.load_seconds = read_reports(self.kept)
        pruned = [b for b in range(self.num_blocks) if b not in set(self.kept)]
        k, total = len(self.kept), self.num_blocks
        self._set("miprun_blocks_total", total)
        self._set("miprun_blocks_kept", k)
        self._set("miprun_keep_ratio", k / total)
        self._set("miprun_kv_capacity_ratio", total / k)
        self._set("miprun_kv_cache_bytes_per_token_saved",
                  kv_bytes_per_token_saved(self.config, len(pruned), self.kv_dtype_bytes))
        from vllm_miprun.model.checkpoint import safetensors_files

        self._set("miprun_weight_bytes_saved", pruned_weight_bytes(safetensors_files(self.model_dir), pruned))
        if self.plan:
            self._set("miprun_predicted_speedup", float(self.plan["predicted_speedup"]),
                      latency_source=str(self.plan.get("latency_source", "unknown")))
            self._set("miprun_scores_source", 1, source=str(self.plan.get("scores_source", "unknown")),
                      method=str(self.plan.get("method", "unknown")))
            if self.plan.get("plan_seconds") is not None:
                self._set("miprun_plan_seconds", float(self.plan["plan_seconds"]))
        else:
            logger.warning("miprun metrics: no plan report for kept blocks %s; plan metrics "
                           "(predicted speed-up, scores source) are not exported", self.kept)
        if self.load_seconds is not None:
            self._set("miprun_load_seconds", self.load_seconds)
        self.baseline = find_cached_baseline(self.model_dir, self.plan, self.cache_dir)
        self.refresh(time.time(), force=True)

    def step(self, engine: int, t: float, tokens: int, running_after: int | None) -> None:
        window = self.windows.setdefault(engine, ThroughputWindow(self.window_s))
        window.step(t, tokens, self.running.get(engine, False))
        if running_after is not None:
            self.running[engine] = running_after > 0
        self.refresh(t, force=running_after == 0)

    def refresh(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_update < UPDATE_EVERY_S:
            return
        self._last_update = now
        if self.load_seconds is None:
            _, self.load_seconds = read_reports(self.kept)
            if self.load_seconds is not None:
                self._set("miprun_load_seconds", self.load_seconds)
        rates = [w.rate(now) for w in self.windows.values()]
        rate = sum(rates) / len(rates) if rates else 0.0  # per engine: comparable to one full model
        baseline_rate, gain = throughput_gain(rate, self.baseline, self.predicted_speedup)
        series = (self.baseline.kind, self.baseline.source)
        self._set("miprun_generation_tokens_per_second", rate)
        self._set("miprun_throughput_baseline_tokens_per_second", baseline_rate,
                  baseline=series[0], source=series[1])
        self._set("miprun_throughput_gain", gain, baseline=series[0])


def _dtype_bytes(cache_dtype: str, model_dtype: Any) -> int:
    """Bytes per KV element: the KV cache dtype, or the model's when it is "auto"."""
    if cache_dtype and cache_dtype != "auto":
        if cache_dtype.startswith("fp8") or cache_dtype.startswith("int8"):
            return 1
        if cache_dtype in ("float32", "fp32"):
            return 4
        return 2
    return int(getattr(model_dtype, "itemsize", 2))


def exporter_for(vllm_config) -> Exporter | None:
    """An exporter for a config that serves a miprun-pruned model, else None."""
    from vllm_miprun.model.remap import FULL_FIELD, KEPT_FIELD

    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    kept = getattr(hf_config, KEPT_FIELD, None)
    if kept is None:
        return None
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.vllm.model_files import resolve_model_dir

    model_dir = resolve_model_dir(model_config.model, model_config.revision)
    extra = vllm_config.load_config.model_loader_extra_config or {}
    return Exporter(
        model_name=str(model_config.served_model_name),
        model_dir=model_dir,
        config=read_config(model_dir),
        kept=list(kept),
        num_blocks=int(getattr(hf_config, FULL_FIELD)),
        kv_dtype_bytes=_dtype_bytes(str(vllm_config.cache_config.cache_dtype), model_config.dtype),
        cache_dir=extra.get("cache_dir") if isinstance(extra, dict) else None,
    )


# --- the vLLM stat logger (entry point ``vllm.stat_logger_plugins``) -----------------------

def _make_stat_logger_class():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    class MiprunStatLogger(AggregateStatLoggerBase):
        """Exports the miprun gauges from the API-server process; a no-op for other models."""

        def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
            self.exporter: Exporter | None = None
            try:
                self.exporter = exporter_for(vllm_config)
                if self.exporter is not None:
                    self.exporter.publish_static()
            except Exception:  # noqa: BLE001 - never stop the server for metrics
                logger.exception("miprun metrics: disabled after an error")
                self.exporter = None

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if self.exporter is None:
                return
            try:
                running = scheduler_stats.num_running_reqs if scheduler_stats is not None else None
                if iteration_stats is not None:
                    self.exporter.step(engine_idx, iteration_stats.iteration_timestamp,
                                       iteration_stats.num_generation_tokens, running)
                elif running is not None:
                    self.exporter.running[engine_idx] = running > 0
            except Exception:  # noqa: BLE001 - an error here would fail every request
                logger.exception("miprun metrics: disabled after an error")
                self.exporter = None

        def log(self):
            if self.exporter is not None:
                try:
                    self.exporter.refresh(time.time(), force=True)
                except Exception:  # noqa: BLE001
                    logger.exception("miprun metrics: disabled after an error")
                    self.exporter = None

        def log_engine_initialized(self):
            pass

    MiprunStatLogger.__qualname__ = "MiprunStatLogger"
    return MiprunStatLogger


def __getattr__(name: str):
    """``MiprunStatLogger`` is built on first use, so importing this module needs no vLLM."""
    if name == "MiprunStatLogger":
        cls = _make_stat_logger_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
