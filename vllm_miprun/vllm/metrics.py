"""Prometheus metrics for what pruning gained, on vLLM's own ``/metrics`` endpoint.

Three kinds of process each know part of the story:

* the **front process** (the one that runs ``EngineArgs.from_cli_args``: the API
  server, or the launcher of several API servers) makes the plan;
* the **worker** (the engine core on one CPU/GPU, or each tensor-parallel worker)
  loads the weights and times it;
* the **API server** serves ``/metrics`` and, through the ``vllm.stat_logger_plugins``
  entry point (:class:`MiprunStatLogger`), sees every engine step.

``loader.record_report`` calls :func:`publish` in the first two; it hands the reports
over through a per-run folder (:mod:`vllm_miprun.vllm.reports`). The stat logger in the
API server reads those files once the engine is up (vLLM builds stat loggers after the
engine core reported ready, so the load is over), and sets ordinary ``prometheus_client`` gauges. A gauge set in the API-server
process shows on ``/metrics`` both without ``PROMETHEUS_MULTIPROC_DIR`` (the global
registry) and with it (``multiprocess_mode="mostrecent"`` writes the value to the
shared folder that vLLM's ``MultiProcessCollector`` reads), so one code path serves
both modes.

Everything above the stat-logger class is plain Python with no vLLM import; the figures
themselves (KV bytes, baseline choice, throughput window) are pure functions in
:mod:`vllm_miprun.core.gains`, and the predicted speed-up is the plan's, from the one
speed model :mod:`vllm_miprun.core.latency`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from vllm_miprun.core.gains import (
    WINDOW_S,
    Baseline,
    ThroughputWindow,
    choose_baseline,
    kv_bytes_per_token_saved,
    kv_capacity_ratio,
    throughput_gain,
)
from vllm_miprun.model.checkpoint import read_config
from vllm_miprun.model.remap import FULL_FIELD, KEPT_FIELD
from vllm_miprun.pipeline.plan import DIGEST_FIELD
from vllm_miprun.vllm.compat import kv_element_bytes
from vllm_miprun.vllm.model_files import plan_kept_reads
from vllm_miprun.vllm.reports import publish, read_kv_layouts, read_reports  # noqa: F401 - publish: loader.record_report

logger = logging.getLogger(f"vllm.{__name__}")

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
        "KV-cache tokens the engine holds for the pruned model over those it would hold "
        "for the full one, from vLLM's KV layouts (KV-cache groups by attention type, "
        "blocks per max-length request) and the engine's block count; where the KV size "
        "is not fixed, the full model's pool is smaller by the pruned weights. L/K when "
        "the layouts are unknown.", ()),
    "miprun_predicted_speedup": (
        "Per-output-token decode speed-up of the kept blocks predicted by the latency "
        "model (label latency_source: profile = measured per-block profile, "
        "flop-byte-estimate = FLOP and byte estimate).", ("latency_source",)),
    "miprun_quality_ppl_ratio": (
        "Perplexity of the kept blocks over the full model's, on held-out calibration text "
        "(documents calibration never reads), measured when the plan is made with a quality "
        "budget; NaN when not measured. Label binding_target: the target that set the number "
        "of blocks (keep, latency_budget, quality_budget or drop).", ("binding_target",)),
    "miprun_healed_ppl_ratio": (
        "The same perplexity ratio for the healed model that is served (heal=linear: maps "
        "fitted for the kept blocks and applied), measured when the plan has a quality budget "
        "and the heal; NaN otherwise. miprun_quality_ppl_ratio is then the unhealed prediction. "
        "Label binding_target as for miprun_quality_ppl_ratio.", ("binding_target",)),
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
    "miprun_plan_info": (
        "Always 1; label digest is the plan digest, a short hash of the kept blocks, the "
        "method and the score cache (also in the plan's log line). Servers, ranks and "
        "instances with one digest serve the same pruned model.", ("digest",)),
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


# --- the exporter in the API-server process ------------------------------------------------

_gauges: dict[str, Any] = {}
_gauge_lock = threading.Lock()


def gauges() -> dict[str, Any]:
    """The miprun gauges of this process, created once (global registry)."""
    from prometheus_client import Gauge

    with _gauge_lock:
        if not _gauges:
            for name, (help_text, labels) in METRICS.items():
                _gauges[name] = Gauge(name, help_text, labelnames=("model_name", *labels),
                                      multiprocess_mode="mostrecent")
        return _gauges


def find_cached_baseline(model_dir: Path, plan: Mapping[str, Any] | None,
                         cache_dir: str | Path | None) -> Baseline:
    """The baseline from the plan's score cache, else from any cache of these weights."""
    from vllm_miprun.pipeline import store as score_cache

    candidates: list[Path] = []
    if plan and plan.get("cache_path"):
        candidates.append(Path(plan["cache_path"]))
    folder = score_cache.cache_folder(cache_dir)
    if folder.is_dir():
        pattern = f"{score_cache.safe_name(model_dir.resolve().name)}-*.json"
        candidates += sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    fingerprint = None
    profile = None
    for path in candidates:
        if not path.is_file():
            continue
        if fingerprint is None:
            from vllm_miprun.pipeline.hub_alias import known_fingerprint

            fingerprint = known_fingerprint(model_dir, cache_dir)  # a partial hub snapshot: its alias
            if fingerprint is None:
                break
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
                 num_blocks: int, kv_dtype_bytes: int | None, cache_dir: str | None = None,
                 window_s: float = WINDOW_S, digest: str | None = None,
                 kv_engine: Mapping[str, int | None] | None = None):
        self.model_name = model_name
        self.model_dir = Path(model_dir)
        self.config = config
        self.kept = list(kept)
        self.num_blocks = num_blocks
        self.kv_dtype_bytes = kv_dtype_bytes
        self.cache_dir = cache_dir
        self.digest = digest
        self.kv_engine = dict(kv_engine or {})  # blocks per engine, fixed KV memory, TP size
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
        weight_bytes_saved = plan_kept_reads(self.model_dir, self.kept)[2]  # pruned-only shards may be absent
        self._set("miprun_kv_capacity_ratio", self.kv_capacity_ratio(weight_bytes_saved))
        if self.kv_dtype_bytes is not None:  # None: a packed KV format whose size vLLM's backend owns
            self._set("miprun_kv_cache_bytes_per_token_saved",
                      kv_bytes_per_token_saved(self.config, len(pruned), self.kv_dtype_bytes))
        self._set("miprun_weight_bytes_saved", weight_bytes_saved)
        if self.plan:
            self._set("miprun_predicted_speedup", float(self.plan["predicted_speedup"]),
                      latency_source=str(self.plan.get("latency_source", "unknown")))
            self._set("miprun_scores_source", 1, source=str(self.plan.get("scores_source", "unknown")),
                      method=str(self.plan.get("method", "unknown")))
            binding = str(self.plan.get("binding_target") or "unknown")
            for name in ("quality_ppl_ratio", "healed_ppl_ratio"):
                ratio = self.plan.get(name)
                self._set(f"miprun_{name}", math.nan if ratio is None else float(ratio), binding_target=binding)
            if self.plan.get("plan_seconds") is not None:
                self._set("miprun_plan_seconds", float(self.plan["plan_seconds"]))
        else:
            logger.warning("miprun metrics: no plan report for kept blocks %s; plan metrics "
                           "(predicted speed-up, scores source) are not exported", self.kept)
        if self.digest is not None:
            self._set("miprun_plan_info", 1, digest=self.digest)
        if self.load_seconds is not None:
            self._set("miprun_load_seconds", self.load_seconds)
        self.baseline = find_cached_baseline(self.model_dir, self.plan, self.cache_dir)
        self.refresh(time.time(), force=True)

    def kv_capacity_ratio(self, weight_bytes_saved: int | None = None) -> float:
        """The engine's figure (:func:`kv_capacity_ratio`); L/K when the worker reported no layouts."""
        if weight_bytes_saved is None:
            weight_bytes_saved = plan_kept_reads(self.model_dir, self.kept)[2]
        layouts = read_kv_layouts(self.kept)
        ratio = None
        if layouts:
            ratio = kv_capacity_ratio(layouts["pruned"], layouts["full"], self.kv_engine.get("blocks"),
                                      self.kv_engine.get("fixed_memory"),
                                      weight_bytes_saved // max(1, self.kv_engine.get("tp", 1)))
        return ratio if ratio is not None else self.num_blocks / len(self.kept)

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


def exporter_for(vllm_config) -> Exporter | None:
    """An exporter for a config that serves a miprun-pruned model, else None."""
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    kept = getattr(hf_config, KEPT_FIELD, None)
    if kept is None:
        return None
    from vllm_miprun.vllm.model_files import ModelSource, resolve_model_dir

    # the engine's download folder and ignore patterns too: the snapshot the loader read
    model_dir = resolve_model_dir(ModelSource.from_configs(model_config, vllm_config.load_config))
    extra = vllm_config.load_config.model_loader_extra_config or {}
    return Exporter(
        model_name=str(model_config.served_model_name),
        model_dir=model_dir,
        config=read_config(model_dir),
        kept=list(kept),
        num_blocks=int(getattr(hf_config, FULL_FIELD)),
        kv_dtype_bytes=kv_element_bytes(str(vllm_config.cache_config.cache_dtype), model_config.dtype),
        cache_dir=extra.get("cache_dir") if isinstance(extra, dict) else None,
        digest=getattr(hf_config, DIGEST_FIELD, None),
        kv_engine=_kv_engine(vllm_config),
    )


def _kv_engine(vllm_config) -> dict[str, int | None]:
    """The engine's KV figures as this API server knows them: blocks of one engine (vLLM
    sums the engines a client talks to), the fixed KV size if any, the TP size."""
    parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
    if parallel.data_parallel_external_lb:
        engines = 1
    elif parallel.data_parallel_hybrid_lb:
        engines = parallel.data_parallel_size_local
    else:
        engines = parallel.data_parallel_size
    blocks = cache.num_gpu_blocks
    return {"blocks": blocks // max(1, engines) if blocks else None,
            "fixed_memory": cache.kv_cache_memory_bytes, "tp": parallel.tensor_parallel_size}


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
                self._disable("start")

        def _disable(self, during: str) -> None:
            """Stop exporting after an error, saying so once with the traceback: an error
            here must never fail a request, and a silent stop would leave stale gauges."""
            logger.warning("miprun metrics: disabled after an error in %s; the miprun_* gauges keep "
                           "their last values and stop updating, serving goes on. Please report this "
                           "traceback", during, exc_info=True)
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
                self._disable("record")

        def log(self):
            if self.exporter is not None:
                try:
                    self.exporter.refresh(time.time(), force=True)
                except Exception:  # noqa: BLE001
                    self._disable("log")

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
