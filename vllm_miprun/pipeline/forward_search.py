"""Searches that run the model on calibration tokens (MI-PRUN's bound, SLEB), and their
answers in the score cache: the next plan for the same model, settings and count costs
nothing, and MI-PRUN's stored greedy order shortens a plan for a smaller count."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from vllm_miprun.core import selection as selectors
from vllm_miprun.core.selection.sleb import prefix_answers as sleb_prefix_answers
from vllm_miprun.model.checkpoint import missing_shards
from vllm_miprun.options import MiprunOptions, resolve_device
from vllm_miprun.pipeline import hub_alias, store as score_cache
from vllm_miprun.pipeline.calibrate import SEARCH_WINDOWS, SearchStart, calibration_ids

logger = logging.getLogger(__name__)

# Methods whose search runs the model on calibration tokens; their results are cached.
FORWARD_METHODS = ("sleb", "mi-prun")
# SLEB's greedy search sees the first 4 calibration sequences. MI-PRUN's soft-target bound
# (KL to the full model) needs only the first 2: the same sets as 4 on SmolLM2, half the cost.
FORWARD_MAX_SAMPLES = 4
MI_PRUN_BOUND_SAMPLES = SEARCH_WINDOWS
# Cached forward-search answers are stored under a key that names the search's configuration,
# so a score cache filled under an earlier default never hands back that default's answer.
SELECTION_KEYS = {"mi-prun": "mi-prun@kl2-drift", "sleb": "sleb"}
# MI-PRUN's greedy block order, stored beside its answers: a later plan for a count it covers
# takes those rounds as they are and only resumes the search past them (refine's ``known``).
GREEDY_TRACE_KEY = SELECTION_KEYS["mi-prun"] + ":greedy"


def cached_selection(method: str, num_blocks: int, num_prune: int, protect: frozenset[int],
                     path, forward: "ForwardSearch", inputs: dict) -> selectors.Selection:
    """Forward-pass methods reuse (and fill) ``cache.selections[SELECTION_KEYS[method]][num_prune]``."""
    cost = inputs.get("cost")
    cacheable = not protect and path is not None
    key = SELECTION_KEYS[method]
    if not cacheable:
        selectors.check_prune_request(num_blocks, num_prune, protect)
        return forward.run(method, num_blocks, num_prune, protect)
    with score_cache.compute_lock(path):  # processes planning at once search once
        selections = score_cache.read_cache(path).selections
        stored = selections.get(key, {}).get(str(num_prune))
        if stored is not None:
            return selectors.make_selection(method, num_blocks, stored, cost=cost)
        selectors.check_prune_request(num_blocks, num_prune, protect)
        known = _stored_order(selections) if method == "mi-prun" else []
        result = forward.run(method, num_blocks, num_prune, protect, known=known)
        score_cache.update_cache(path, lambda cache: _store_answers(cache.selections, method, num_prune, result))
    return result


def _store_answers(selections: dict, method: str, num_prune: int, result: selectors.Selection) -> None:
    """A forward search's answer for ``num_prune``, and what it tells about other counts: every
    prefix of SLEB's greedy trace is SLEB's answer; MI-PRUN's greedy order is kept for resuming."""
    found = {str(num_prune): list(result.pruned)}
    if method == "sleb":
        found.update({str(count): pruned for count, pruned in sleb_prefix_answers(result).items()})
    selections.setdefault(SELECTION_KEYS[method], {}).update(found)
    order = [step["block"] for step in result.details.get("greedy_trace", ())]
    if method == "mi-prun" and len(order) > len(_stored_order(selections)):
        selections[GREEDY_TRACE_KEY] = {str(len(order)): order}


def _stored_order(selections: dict) -> list[int]:
    """MI-PRUN's longest stored greedy order (empty when none is stored)."""
    return max(selections.get(GREEDY_TRACE_KEY, {}).values(), key=len, default=[])


class ForwardSearch:
    """Searches that run the model on calibration tokens; the model is loaded on first use.

    ``start``: what the calibration this plan just ran computed (its windows, and the first
    windows' boundary states, which are MI-PRUN's full pass); without it the search tokenises
    the calibration text and runs the full model itself."""

    def __init__(self, model_dir, options: MiprunOptions, cost, start: SearchStart | None = None):
        self.model_dir, self.options, self.cost = model_dir, options, cost
        self._start = start
        self._model = None
        self._ids = None
        self._mi_prun_loss = None  # one evaluator for every count this plan searches (refine's memo)

    def model(self):
        """The block-by-block model, loaded on first use (shared with the quality probe)."""
        if self._model is None:
            if not hub_alias.has_every_shard(self.model_dir):  # planned from a hub alias's cached scores
                raise hub_alias.MissingWeightsError(
                    f"{self.model_dir} lacks the shards {missing_shards(self.model_dir)}, and method "
                    f"{self.options.method} has no cached answer for this request (a search that runs every "
                    "block on calibration tokens); fetch every shard, or plan with a method that needs no "
                    "forward search"
                )
            from vllm_miprun.model.blockwise import BlockwiseModel

            device = resolve_device(self.options.device)
            self._model = BlockwiseModel(self.model_dir, device=device, resident_blocks=True,
                                         max_memory=self.options.max_memory)
        return self._model

    def _load(self):
        if self._ids is None:
            ids = self._start.input_ids if self._start else calibration_ids(self.model_dir, self.options.calibration)
            self._ids = ids[:FORWARD_MAX_SAMPLES]
        return self.model(), self._ids

    def run(self, method: str, num_blocks: int, num_prune: int, protect: frozenset[int],
            known: Sequence[int] = ()) -> selectors.Selection:
        """``known``: MI-PRUN's greedy order from an earlier plan on this cache (see GREEDY_TRACE_KEY)."""
        logger.info("%s: searching %d blocks to prune with forward passes on calibration tokens",
                    method, num_prune)
        start = time.perf_counter()
        model, ids = self._load()
        if method == "mi-prun":
            from vllm_miprun.pipeline.refine import CalibrationKL, refine

            if self._mi_prun_loss is None:
                # calibration ran on this model's device and dtype (both from these options)
                states = self._start.states if self._start else None
                self._mi_prun_loss = CalibrationKL(model, ids[:MI_PRUN_BOUND_SAMPLES], states=states)
            result = refine(self.model_dir, ids[:MI_PRUN_BOUND_SAMPLES], self.cost, num_prune, protect, model=model,
                            evaluator=self._mi_prun_loss, known=known)
        else:
            from vllm_miprun.pipeline.refine import sleb

            result = sleb(model, ids, num_prune, protect, cost=self.cost)
        logger.info("%s: searched %d blocks to prune in %.1f s (%d greedy rounds taken from the score cache)",
                    method, num_prune, time.perf_counter() - start, result.details.get("known_rounds", 0))
        return result
