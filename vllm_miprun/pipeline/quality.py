"""Quality on held-out calibration text: the perplexity ratio of a pruned set to the dense model.

The quality budget (``quality_budget``) and the quality figure ``vllm-miprun plan`` prints
both come from here. The text is :func:`vllm_miprun.pipeline.corpora.validation_token_windows`:
documents of the calibration part that calibration never reads, ``VALIDATION_SAMPLES``
windows of the calibration ``seq_len``. The pruned model runs block by block
(:class:`~vllm_miprun.model.blockwise.BlockwiseModel`), and its loss is
:class:`~vllm_miprun.pipeline.refine.CalibrationCE` on those windows (prefix reuse, so the sets
a walk measures share the full model's early states).

The ratio is ``exp(NLL(pruned) - NLL(dense))``: pruned over dense perplexity. Each mean NLL is
stored in the score cache (``ScoreCache.quality``) under the validation setup and the pruned
set, so a second plan with the same settings makes no forward pass at all.

With ``heal=linear`` the served model is the healed one: :meth:`QualityProbe.healed_ratio`
fits the maps of a set with the loader's own fit (``pipeline.heal.prepare_maps``, which
stores them where the loader reads them), applies them to the pruned model on the same
windows, and stores that NLL under a setup that names the heal recipe.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable

from vllm_miprun.pipeline import hub_alias, store as score_cache

logger = logging.getLogger(__name__)

# 8 windows x the calibration seq_len (256 by default): a few seconds on SmolLM2-135M on a CPU.
VALIDATION_SAMPLES = 8


def validation_setup(calibration, heal: str = "none") -> str:
    """The key of the stored NLLs: what text they were measured on, and how (healed NLLs
    name the recipe, so a changed recipe measures again)."""
    if heal == "none":
        return f"validation:{VALIDATION_SAMPLES}x{calibration.seq_len}:heal=none"
    from vllm_miprun.pipeline.heal import recipe_digest

    return f"validation:{VALIDATION_SAMPLES}x{calibration.seq_len}:heal={heal}:{recipe_digest(heal)}"


def set_key(pruned: Iterable[int]) -> str:
    return ",".join(str(b) for b in sorted(int(b) for b in pruned))


def stored_ratio(nll: dict[str, float], pruned: Iterable[int]) -> float | None:
    """Validation perplexity of the model without ``pruned`` over the dense model's, from the
    mean NLLs in ``nll`` (by :func:`set_key`); None while either is missing."""
    keys = set_key(pruned), set_key(())
    if not all(key in nll for key in keys):
        return None
    try:
        return math.exp(nll[keys[0]] - nll[keys[1]])
    except OverflowError:  # finite NLLs far apart: a ratio beyond any budget
        return math.inf


def validation_ids(model_dir, calibration):
    """The validation windows [VALIDATION_SAMPLES, seq_len] as a tensor."""
    import torch

    from vllm_miprun.pipeline.calibrate import load_tokenizer
    from vllm_miprun.pipeline.corpora import validation_token_windows

    windows = validation_token_windows(load_tokenizer(model_dir), calibration.dataset, calibration.samples,
                                       calibration.seq_len, calibration.seed, VALIDATION_SAMPLES,
                                       calibration.seq_len)
    return torch.from_numpy(windows)


class QualityProbe:
    """Perplexity ratios of pruned sets on the validation windows, read from and written to
    the score cache at ``cache_path`` (None: kept in memory only, e.g. score-free methods).

    ``load_model`` returns the :class:`BlockwiseModel` to run; it is called only when a
    ratio is not cached, so a fully cached plan loads nothing."""

    def __init__(self, model_dir, options, cache_path: Path | None, load_model: Callable[[], object]):
        self.model_dir, self.options, self.cache_path = model_dir, options, cache_path
        self.load_model = load_model
        self.setup = validation_setup(options.calibration)
        self.healed_setup = validation_setup(options.calibration, options.heal)
        self.nll: dict[str, float] = {}
        self.healed_nll: dict[str, float] = {}
        if cache_path is not None and Path(cache_path).is_file():
            stored = score_cache.read_cache(cache_path).quality
            self.nll = dict(stored.get(self.setup, {}))
            self.healed_nll = dict(stored.get(self.healed_setup, {}))
        self.computed = False
        self._evaluator = None

    @property
    def source(self) -> str:
        return "computed" if self.computed else "cache-hit"

    def ratio(self, pruned: Iterable[int]) -> float:
        """Validation perplexity of the model without ``pruned``, over the dense model's."""
        pruned = tuple(sorted(int(b) for b in pruned))
        if not pruned:
            return 1.0
        self._mean_nll(pruned)  # measured (and stored) where the score cache lacks them
        self._mean_nll(())
        return stored_ratio(self.nll, pruned)

    def healed_ratio(self, pruned: Iterable[int], num_blocks: int) -> float:
        """Validation perplexity of the healed model without ``pruned`` (maps fitted for this
        set, as the loader would fold them), over the dense model's."""
        pruned = tuple(sorted(int(b) for b in pruned))
        if not pruned:
            return 1.0
        key = set_key(pruned)
        if key not in self.healed_nll:
            self._store(self.healed_nll, self.healed_setup, pruned, lambda: self._healed_nll(pruned, num_blocks))
        return math.exp(self.healed_nll[key] - self._mean_nll(()))

    def _healed_nll(self, pruned: tuple[int, ...], num_blocks: int) -> float:
        from vllm_miprun.pipeline.heal import prepare_maps

        kept = [b for b in range(num_blocks) if b not in pruned]
        maps = prepare_maps(self.model_dir, self.options, kept, num_blocks, progress=False)
        return healed_loss(self._evaluate(), pruned, maps)

    def _mean_nll(self, pruned: tuple[int, ...]) -> float:
        key = set_key(pruned)
        if key not in self.nll:
            self._store(self.nll, self.setup, pruned, lambda: self._evaluate()(frozenset(pruned)))
        return self.nll[key]

    def _store(self, nll: dict[str, float], setup: str, pruned: tuple[int, ...], measure: Callable[[], float]) -> None:
        start, key = time.perf_counter(), set_key(pruned)
        value = nll[key] = float(measure())
        # benchmarks/cold_start.py reads "measured N pruned block(s) in S s"
        logger.info("quality: measured %d pruned block(s) in %.1f s (%s)", len(pruned), time.perf_counter() - start,
                    setup)
        self.computed = True
        if self.cache_path is not None:
            score_cache.update_cache(self.cache_path, lambda cache: cache.quality.setdefault(
                setup, {}).update({key: value}))

    def _evaluate(self):
        if self._evaluator is None:
            if not hub_alias.has_every_shard(self.model_dir):
                raise hub_alias.MissingWeightsError(
                    f"{self.model_dir} lacks some weight shards, and the quality of this plan is not in the "
                    "score cache; measuring it runs every block on validation text, so fetch every shard"
                )
            from vllm_miprun.pipeline.refine import CalibrationCE

            ids = validation_ids(self.model_dir, self.options.calibration)
            logger.info("quality: measuring perplexity ratios on %d validation windows of %d tokens",
                        ids.shape[0], ids.shape[1])
            self._evaluator = CalibrationCE(self.load_model(), ids)
        return self._evaluator


def healed_loss(evaluator, pruned: tuple[int, ...], maps: dict) -> float:
    """The mean NLL of the pruned model with ``maps`` applied where the loader folds them:
    run start ``s`` scales the MLP part of block ``s-1``'s output (``heal.block_parts``), or
    the embedding for ``s = 0``. Starts from the evaluator's stored full-model state before
    the first block that differs."""
    import torch

    with torch.inference_mode():
        return _healed_loss(evaluator, pruned, maps)


def _healed_loss(evaluator, pruned: tuple[int, ...], maps: dict) -> float:
    from vllm_miprun.pipeline.heal_fit import block_parts

    model, pruned_set = evaluator.model, set(pruned)
    first = max(min(pruned) - 1, 0)
    h = evaluator.states[first]
    if 0 in maps:
        h = h @ maps[0].to(h).T
    for b in range(first, model.num_blocks):
        if b in pruned_set:
            continue
        with model.block(b) as layer:
            if b + 1 in maps:
                r, d = block_parts(model, layer, h)
                h = r + d @ maps[b + 1].to(d).T
            else:
                h = model.run_block(layer, h)
    return evaluator.loss(h)


def select_for_quality(options, num_blocks: int, protect: frozenset[int], latency,
                       select_for: Callable[[int], object], probe: QualityProbe):
    """The selection for a quality budget, alone or with a latency budget.

    Alone: the most blocks whose validation perplexity ratio stays within the budget
    (:func:`~vllm_miprun.core.selection.quality.most_pruned_within` over the selector's set
    for each count). With a latency budget: the latency budget's selection when its ratio
    is within the quality budget (the latency budget bound), else the most blocks below that
    count that keep the quality budget (the quality budget bound; the latency budget is then
    not met, and a warning says so). ``details`` names the binding target and the ratio.

    With a heal (``linear`` or ``distill``) the budget holds for the healed model: the walk runs on unhealed
    ratios (no fit), then :func:`~vllm_miprun.core.selection.healed.healed_count` steps from
    its count on healed ratios (one fit each), and the latency plan binds when its healed
    ratio fits. ``details`` then holds both ratios of the chosen set."""
    from dataclasses import replace

    from vllm_miprun.core import selection as selectors
    from vllm_miprun.core.selection.healed import healed_count
    from vllm_miprun.core.selection.quality import most_pruned_within

    budget, healing = options.quality_budget, options.heal != "none"
    max_prune = num_blocks - max(1, len(protect))

    def ratios_of(pruned) -> dict:
        found = {"quality_ppl_ratio": probe.ratio(pruned)}
        if healing:
            found["healed_ppl_ratio"] = probe.healed_ratio(pruned, num_blocks)
        return found

    if options.latency_budget is not None:
        fast = selectors.select_for_latency(options.method, options.latency_budget, latency, selector=select_for,
                                            protect=protect)
        found = ratios_of(fast.pruned)
        ratio = found.get("healed_ppl_ratio", found["quality_ppl_ratio"])
        if ratio <= budget:
            return replace(fast, details={**fast.details, "binding_target": "latency_budget", **found})
        logger.warning("quality budget %.3g binds: latency budget %s needs %d blocks pruned, whose perplexity "
                       "ratio %.3f is over it; pruning fewer, so the latency budget is not met",
                       budget, options.latency_budget, len(fast.pruned), ratio)
        max_prune = len(fast.pruned) - 1
    walk = most_pruned_within(budget, max_prune, lambda count: probe.ratio(select_for(count).pruned))
    extra = {"quality_ratios": walk.ratios}
    if healing:
        step = healed_count(budget, walk.num_prune, max_prune,
                            lambda count: probe.healed_ratio(select_for(count).pruned, num_blocks))
        walk, extra = step, {**extra, "healed_ratios": step.ratios}
    if walk.num_prune == 0:
        logger.warning("quality budget %.3g: pruning even one block raises perplexity by %.3fx; "
                       "keeping every block", budget, walk.ratios.get(1, math.nan))
        chosen = selectors.make_selection(options.method, num_blocks, ())
    else:
        chosen = select_for(walk.num_prune)
    return replace(chosen, details={**chosen.details, "binding_target": "quality_budget",
                                    **ratios_of(chosen.pruned), **extra})
