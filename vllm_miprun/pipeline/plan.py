"""Planning: options + model folder -> score cache -> selection -> the blocks to keep.

This is the one place where the loader, the CLI and the benchmarks turn options into a
plan, so all of them choose the same blocks for the same inputs. Methods that need
forward passes (MI-PRUN, SLEB) store their results in the score cache
(:mod:`vllm_miprun.pipeline.forward_search`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vllm_miprun.pipeline import hub_alias, store as score_cache
from vllm_miprun.core import selection as selectors
from vllm_miprun.model.checkpoint import read_config
from vllm_miprun.model.quantization import check_checkpoint_quantization
from vllm_miprun.core.latency import LatencyModel
from vllm_miprun.errors import ModelFolderError
from vllm_miprun.pipeline.quality import QualityProbe, select_for_quality, stored_ratio, validation_setup
from vllm_miprun.pipeline.speed_store import read_profile
from vllm_miprun.option_values import MAX_BLOCK_INDEX
from vllm_miprun.options import MiprunOptions, OptionError, check_drop, resolve_device
from vllm_miprun.pipeline.forward_search import (FORWARD_METHODS, SELECTION_KEYS, ForwardSearch,
                                                 cached_selection)

logger = logging.getLogger(__name__)

SCORE_FREE_METHODS = ("last", "random")
# A plan's method when the user named the blocks (the ``drop`` option).
DROP_METHOD = "drop"


@dataclass(frozen=True)
class Plan:
    num_blocks: int
    kept: tuple[int, ...]
    pruned: tuple[int, ...]
    method: str
    keep_ratio: float
    predicted_speedup: float
    latency_source: str
    objective: float | None
    scores_source: str          # "cache-hit" | "computed" | "none-needed"
    cache_path: str | None
    fingerprint: str | None
    # Perplexity on held-out calibration text, pruned over dense (pipeline.quality): measured by a
    # quality budget or ``measure_quality``, else read from the score cache if stored; else None.
    quality_ppl_ratio: float | None = None
    # With a heal (linear or distill) and a quality budget: the same ratio for the healed model that is served
    # (maps fitted for these blocks and applied); quality_ppl_ratio is then the unhealed prediction.
    healed_ppl_ratio: float | None = None
    # The target that set the number of blocks: keep, latency_budget, quality_budget or drop.
    binding_target: str | None = None
    scores_key: str | None = None  # the score cache's key: weights, calibration, compute

    @property
    def digest(self) -> str:
        return plan_digest(self.kept, self.num_blocks, self.method, self.scores_key)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kept"], data["pruned"] = list(self.kept), list(self.pruned)
        data["digest"] = self.digest
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        fields = {key: value for key, value in data.items() if key != "digest"}  # derived, not stored
        return cls(**{**fields, "kept": tuple(data["kept"]), "pruned": tuple(data["pruned"])})


# Config fields (through hf_overrides) that carry the digest and what it hashes to every process.
DIGEST_FIELD = "miprun_plan_digest"
DIGEST_SOURCE_FIELD = "miprun_plan_source"


def digest_fields(plan: Plan) -> dict[str, Any]:
    return {DIGEST_FIELD: plan.digest, DIGEST_SOURCE_FIELD: {"method": plan.method, "scores": plan.scores_key}}


def check_digest(kept, num_blocks: int, digest: str | None, source: dict | None) -> None:
    """Refuse a config whose kept blocks are not the plan its digest names (overrides
    mixed from two plans, or edited by hand); a config without a digest passes."""
    if digest is None:
        return
    source = source or {}
    expected = plan_digest(kept, num_blocks, str(source.get("method")), source.get("scores"))
    if expected != digest:
        raise OptionError(
            f"this config carries plan digest {digest}, but its kept blocks {list(kept)} of {num_blocks} "
            f"(method {source.get('method')}) hash to {expected}; every process must serve one plan: "
            f"drop the {DIGEST_FIELD} and miprun_* keys from --hf-overrides and plan again"
        )


def plan_digest(kept, num_blocks: int, method: str, scores_key: str | None) -> str:
    """A short hash of what a plan decided and from what: two processes or instances
    serve the same pruned model exactly when their digests agree."""
    payload = json.dumps({"kept": [int(b) for b in kept], "num_blocks": int(num_blocks),
                          "method": method, "scores": scores_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def make_plan(model_dir: str | Path, options: MiprunOptions, hf_config: dict | None = None,
              progress: bool = True, measure_quality: bool = False) -> Plan:
    """Choose the blocks to keep; raise ``OptionError``/``CacheError`` on bad input.

    A quality budget always measures the plan's validation perplexity ratio;
    ``measure_quality`` measures it for the other targets too (``vllm-miprun plan``)."""
    config = hf_config if hf_config is not None else read_config(model_dir)
    check_checkpoint_quantization(model_dir, config)  # an unreadable format is refused before any work
    if options.heal != "none":  # a format no map folds into is refused before calibrating
        from vllm_miprun.pipeline.heal import check_heal_quantization

        check_heal_quantization(config)
    num_blocks = _num_blocks(config)
    try:
        protect = selectors.parse_protect(options.protect, num_blocks)
    except ValueError as err:
        raise OptionError(str(err)) from None
    if num_blocks == 1 and options.drop is None:  # drop is checked (and refused) as usual
        return single_block_plan(model_dir, config, options)
    if options.drop is not None:
        plan = explicit_plan(model_dir, config, options, num_blocks, protect)
        return _with_quality(plan, _probe(model_dir, options, None, None)) if measure_quality else plan

    cache, path, source, start = None, None, "none-needed", None
    if options.method not in SCORE_FREE_METHODS:
        cache, path, source, start = load_scores(model_dir, options, progress=progress)
        if cache.num_blocks != num_blocks:
            raise score_cache.CacheError(
                f"score cache {path} scores {cache.num_blocks} blocks but the model has {num_blocks}; "
                "recalibrate this model"
            )
    latency = latency_model(model_dir, config, cache, options.cache_dir)
    forward = ForwardSearch(model_dir, options, _score_inputs(cache).get("cost"), start)
    probe = _probe(model_dir, options, path, forward) if measure_quality or options.quality_budget else None
    selection = _select(model_dir, options, num_blocks, protect, cache, path, latency, forward, probe)
    plan = Plan(
        num_blocks=num_blocks,
        kept=selection.kept,
        pruned=selection.pruned,
        method=options.method,
        keep_ratio=len(selection.kept) / num_blocks,
        predicted_speedup=latency.speedup(selection.kept),
        latency_source=latency.source,
        objective=selection.objective,
        scores_source=source,
        cache_path=str(path) if path else None,
        fingerprint=cache.fingerprint if cache else None,
        binding_target=selection.details.get("binding_target", _target_name(options)),
        scores_key=score_cache.cache_key(cache.fingerprint, cache.calibration) if cache else None,
        healed_ppl_ratio=selection.details.get("healed_ppl_ratio"),
    )
    if probe is not None:
        return _with_quality(plan, probe)
    return _with_stored_quality(plan, cache, options) if cache is not None else plan


def _with_stored_quality(plan: Plan, cache, options: MiprunOptions) -> Plan:
    """A plan whose quality nobody asked to measure still reports it when an earlier
    ``vllm-miprun plan`` or quality budget stored it in the score cache (already read)."""
    ratio = stored_ratio(cache.quality.get(validation_setup(options.calibration), {}), plan.pruned)
    return plan if ratio is None else replace(plan, quality_ppl_ratio=ratio)


def _target_name(options: MiprunOptions) -> str:
    return "keep" if options.keep is not None else "latency_budget"


def _probe(model_dir, options: MiprunOptions, path, forward: "ForwardSearch | None") -> QualityProbe:
    forward = forward or ForwardSearch(model_dir, options, None)
    return QualityProbe(model_dir, options, path, forward.model)


def _with_quality(plan: Plan, probe: QualityProbe) -> Plan:
    """``plan`` with its validation perplexity ratio (measured, or read from the score cache).
    Without a quality budget it is information only: a snapshot without every shard skips it."""
    try:
        ratio = probe.ratio(plan.pruned)
    except hub_alias.MissingWeightsError as err:
        if probe.options.quality_budget is not None:
            raise
        logger.info("quality not measured: %s", err)
        return plan
    logger.info("quality: perplexity ratio %.4f on validation text (%s)", ratio, probe.source)
    return replace(plan, quality_ppl_ratio=ratio)


def single_block_plan(model_dir: str | Path, config: dict, options: MiprunOptions) -> Plan:
    """A model with one decoder block keeps it whatever the target (at least one block is
    always kept): it is served whole, without calibrating or searching."""
    logger.warning("%s has one decoder block: nothing can be pruned, so it is served whole", model_dir)
    latency = latency_model(model_dir, config, None, options.cache_dir)
    targets = ("keep", "latency_budget", "quality_budget")
    target = next((name for name in targets if getattr(options, name, None) is not None), "keep")
    return Plan(
        num_blocks=1, kept=(0,), pruned=(), method=options.method, keep_ratio=1.0,
        predicted_speedup=latency.speedup((0,)), latency_source=latency.source, objective=None,
        scores_source="none-needed", cache_path=None, fingerprint=None, binding_target=target,
    )


def explicit_plan(model_dir: str | Path, config: dict, options: MiprunOptions, num_blocks: int,
                  protect: frozenset[int]) -> Plan:
    """The plan for an explicit ``drop`` list: exactly those blocks go, no scores, no search."""
    check_drop(options.drop, num_blocks, protect)
    pruned = tuple(options.drop)
    kept = tuple(b for b in range(num_blocks) if b not in pruned)
    latency = latency_model(model_dir, config, None, options.cache_dir)
    return Plan(
        num_blocks=num_blocks, kept=kept, pruned=pruned, method=DROP_METHOD,
        keep_ratio=len(kept) / num_blocks, predicted_speedup=latency.speedup(kept),
        latency_source=latency.source, objective=None, scores_source="none-needed",
        cache_path=None, fingerprint=None, binding_target="drop",
    )


def load_scores(model_dir: str | Path, options: MiprunOptions, progress: bool = True):
    """(cache, path, source, search start): the explicit ``scores`` file, the matching cache, or
    a new one; the last is MI-PRUN's :class:`~vllm_miprun.pipeline.calibrate.SearchStart` when
    this call calibrated for an MI-PRUN plan, else None."""
    from vllm_miprun.pipeline.calibrate import calibrate, calibration_key, check_compute

    settings = options.calibration
    path, fingerprint, compute = scores_location(model_dir, options)
    if compute is None:
        return score_cache.read_cache(path, fingerprint=fingerprint), path, "cache-hit", None
    if path.exists():
        cache = score_cache.read_cache(path, fingerprint, calibration_key(settings, compute))
        check_compute(cache, compute, path)
        return cache, path, "cache-hit", None
    if options.require_cache:
        raise score_cache.CacheError(
            f"no score cache for {model_dir} with calibration {settings.to_json()} at {path}, and "
            f"require_cache is set; run `vllm-miprun calibrate {model_dir}` first or drop require_cache"
        )
    logger.info("no score cache for %s; calibrating now (%s). This is done once per model and settings; later "
                "starts read %s. To do it before serving, run `vllm-miprun calibrate %s` with the same "
                "calibration options", model_dir, settings.to_json(),
                path, model_dir)
    result = calibrate(model_dir, settings, device=resolve_device(options.device), cache_dir=options.cache_dir,
                       progress=progress, keep_search_start=options.method == "mi-prun")
    return result.cache, result.path, "cache-hit" if result.reused else "computed", result.search_start


def scores_location(model_dir: str | Path, options: MiprunOptions) -> tuple[Path, str, str | None]:
    """(path, fingerprint, compute): where this plan reads its scores. The ``scores`` file as
    given (compute None: its settings are not checked), else the cache for these settings as
    computed on ``options.device`` (a CUDA plan never reads a CPU cache, nor the reverse)."""
    from vllm_miprun.pipeline.calibrate import compute_identity, locate

    if options.scores:
        _, fingerprint = locate(model_dir, options.calibration, options.cache_dir)
        return Path(options.scores).expanduser(), fingerprint, None
    compute = compute_identity(model_dir, options.device)
    path, fingerprint = locate(model_dir, options.calibration, options.cache_dir, compute)
    return path, fingerprint, compute


def answered_by_cache(model_dir: str | Path, options: MiprunOptions) -> bool:
    """Whether ``make_plan`` would read everything it needs from the score cache (no
    calibration, no forward search): a cached score-only plan, or a forward method's stored
    answer for a ``keep`` count. Conservative: a latency budget with a forward method is False."""
    from vllm_miprun.pipeline.calibrate import calibration_key

    path, _, compute = scores_location(model_dir, options)  # the file make_plan reads, on this device
    if not path.is_file():
        return False
    if options.method not in FORWARD_METHODS:
        return True
    if options.keep is None or options.protect:
        return False
    key = None if compute is None else calibration_key(options.calibration, compute)  # None: a scores file
    try:
        cache = score_cache.read_cache(path, None, key)
    except score_cache.CacheError:
        return False
    num_prune = cache.num_blocks - selectors.keep_count(options.keep, cache.num_blocks)
    return str(num_prune) in cache.selections.get(SELECTION_KEYS[options.method], {})


def scores_cached_for_commit(model_dir: str | Path, options: MiprunOptions) -> bool:
    """Whether the scores this plan reads are known for ``model_dir``'s hub commit without
    its weights: a valid hub alias, and a score cache (or the ``scores`` file) made for the
    alias's fingerprint and, for the cache, these calibration settings (``hub_alias``)."""
    from vllm_miprun.pipeline.calibrate import calibration_key, compute_identity

    fingerprint = hub_alias.read_alias(model_dir, options.cache_dir)
    if fingerprint is None:
        return False
    key = calibration_key(options.calibration, compute_identity(model_dir, options.device))
    path = (Path(options.scores).expanduser() if options.scores
            else score_cache.cache_path(model_dir, fingerprint, key, options.cache_dir))
    if not path.is_file():
        logger.info("hub alias of %s found, but no score cache at %s", model_dir, path)
        return False
    try:
        score_cache.read_cache(path, fingerprint, None if options.scores else key)
    except score_cache.CacheError as err:
        logger.info("hub alias of %s found, but its score cache is not usable: %s", model_dir, err)
        return False
    return True


def latency_model(model_dir, config: dict, cache: score_cache.ScoreCache | None,
                  cache_dir: str | None = None) -> LatencyModel:
    """The measured per-block profile (score cache, else the weights' speed sidecar that
    ``vllm-miprun profile`` writes), else the FLOP-and-byte estimate."""
    if cache is not None and cache.profile:
        return LatencyModel.from_profile(cache.profile)
    # A hub snapshot fetched in part knows its fingerprint only through its hub alias;
    # without one no sidecar can be found for it.
    fingerprint = cache.fingerprint if cache is not None else hub_alias.known_fingerprint(model_dir, cache_dir)
    profile = read_profile(model_dir, cache_dir, fingerprint) if fingerprint else None
    if profile:
        return LatencyModel.from_profile(profile)
    logger.info("no latency profile; using the FLOP-and-byte estimate from the model config")
    try:
        return LatencyModel.from_config(config)
    except ValueError as err:  # a size the estimate needs is missing or absurd: the folder's fault
        raise ModelFolderError(f"{Path(model_dir) / 'config.json'}: {err}; restore config.json from the "
                               "model's source") from None


def _select(model_dir, options: MiprunOptions, num_blocks: int, protect: frozenset[int],
            cache, path, latency: LatencyModel, forward: "ForwardSearch",
            probe: QualityProbe | None) -> selectors.Selection:
    inputs = _score_inputs(cache)

    def select_for(num_prune: int) -> selectors.Selection:
        if options.method not in FORWARD_METHODS:
            return selectors.select(options.method, num_blocks, num_prune, protect=protect, seed=options.seed,
                                    **inputs)
        return cached_selection(options.method, num_blocks, num_prune, protect, path, forward, inputs)

    try:
        if options.keep is not None:
            return select_for(num_blocks - selectors.keep_count(options.keep, num_blocks))
        if options.quality_budget is not None:
            return select_for_quality(options, num_blocks, protect, latency, select_for, probe)
        return selectors.select_for_latency(options.method, options.latency_budget, latency, selector=select_for,
                                            protect=protect)
    except ValueError as err:
        if isinstance(err, (OptionError, score_cache.CacheError)):
            raise
        raise OptionError(str(err)) from None


def _score_inputs(cache) -> dict[str, Any]:
    if cache is None:
        return {}
    from vllm_miprun.core.span_cost import span_cost_matrix
    from vllm_miprun.core.matrices import from_nested_list

    return {
        "cost": span_cost_matrix(cache),
        "block_influence": np.asarray(cache.baselines["block_influence"], dtype=float),
        "angular": from_nested_list(cache.baselines["angular"]),
    }


def _num_blocks(config: dict) -> int:
    value = config.get("num_hidden_layers")
    if type(value) is not int or not 1 <= value <= MAX_BLOCK_INDEX + 1:  # more would take forever to plan
        raise OptionError(f"config.json must give num_hidden_layers as a positive integer, got {str(value)[:40]} "
                          f"(at most {MAX_BLOCK_INDEX + 1})")
    return value
