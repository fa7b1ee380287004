"""The quality budget with heal=linear: the budget holds for the healed model that is served.

The tiny random model's ratios are not monotone, so budgets are derived from healed ratios
measured on the same model, and the stepping is also checked as a pure function."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_miprun.core.selection import select_last
from vllm_miprun.core.selection.healed import healed_count
from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.options import MiprunOptions
from vllm_miprun.pipeline import heal
from vllm_miprun.pipeline import store as score_cache
from vllm_miprun.pipeline.plan import make_plan
from vllm_miprun.pipeline.quality import QualityProbe, validation_ids, validation_setup
from vllm_miprun.tools.evaluate import TransformersBackend, perplexity

SMALL = {"samples": 4, "seq_len": 32, "device": "cpu", "method": "last"}


# --- the step (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("start, budget, expected, asked", [
    (3, 1.25, 4, [3, 4, 5]),     # the heal lets one more block go: up, stop at the first over
    (3, 1.35, 5, [3, 4, 5, 6]),  # two more
    (3, 1.15, 2, [3, 2]),        # healed(start) over (the heal made it worse): down to the first within
    (3, 1.01, 0, [3, 2, 1]),     # nothing fits: the dense model, never measured
    (0, 1.05, 0, [1]),           # the unhealed walk kept every block; the heal may still allow one
    (7, 9.0, 7, [7]),            # never past max_prune
    (3, 1.2, 3, [3, 4]),         # a ratio equal to the budget is within it, at the start
    (3, 1.24, 4, [3, 4, 5]),     # and one step up
])
def test_step_finds_the_largest_count_within_budget_from_the_walks_count(start, budget, expected, asked):
    ratios = [1.0, 1.1, 1.12, 1.2, 1.24, 1.3, 1.4, 2.0]
    seen = []

    def ratio_for(count):
        seen.append(count)
        return ratios[count]

    walk = healed_count(budget, start, 7, ratio_for)
    assert (walk.num_prune, seen) == (expected, asked)
    assert walk.ratio == ratios[expected]


def test_step_refuses_a_start_outside_the_counts():
    with pytest.raises(ValueError, match=r"start must be in \[0, 3\], got 4"):
        healed_count(1.2, 4, 3, lambda count: 1.0)


# --- plans on a tiny model ---------------------------------------------------------------


def _options(cache_dir, **extra):
    return MiprunOptions.from_dict({**SMALL, "cache_dir": str(cache_dir), **extra})


def _served_ratio(model_dir, options, pruned) -> float:
    """The healed ratio through another path: the Hugging Face model with the blocks deleted
    and the maps folded in as the eval backend folds them, maps from the loader's own call."""
    kept = [b for b in range(8) if b not in set(pruned)]
    maps = heal.prepare_maps(model_dir, options, kept, 8, progress=False)
    assert maps  # a run to heal
    windows = validation_ids(model_dir, options.calibration).numpy()
    dense = perplexity(TransformersBackend(model_dir), windows)["ppl"]
    return perplexity(TransformersBackend(model_dir, kept=kept, heal_maps=maps), windows)["ppl"] / dense


@pytest.fixture(scope="module")
def measured(tiny_llama_dir, tmp_path_factory):
    """Unhealed and healed ratios of the last 5, 6 and 7 blocks, each set's maps fitted apart."""
    options = _options(tmp_path_factory.mktemp("probe"), keep=0.5, heal="linear")
    probe = QualityProbe(tiny_llama_dir, options, None, lambda: BlockwiseModel(tiny_llama_dir))
    sets = {n: select_last(8, n).pruned for n in (5, 6, 7)}
    return ({n: probe.ratio(pruned) for n, pruned in sets.items()},
            {n: probe.healed_ratio(pruned, 8) for n, pruned in sets.items()})


def _healed_plan(model_dir, cache_dir, budget):
    return make_plan(model_dir, _options(cache_dir, quality_budget=budget, heal="linear"), progress=False)


def test_the_heal_lets_the_plan_step_past_the_unhealed_walk(tiny_llama_dir, tmp_path, measured):
    unhealed, healed = measured
    assert healed[7] < unhealed[7] and unhealed[6] < healed[7]  # this seeded model: the heal helps 7
    budget = (healed[7] + unhealed[7]) / 2  # the unhealed walk stops at 6; healed, 7 fits
    plan = _healed_plan(tiny_llama_dir, tmp_path, budget)
    assert plan.binding_target == "quality_budget" and len(plan.pruned) == 7
    assert plan.healed_ppl_ratio == pytest.approx(healed[7], rel=1e-5)
    assert plan.quality_ppl_ratio == pytest.approx(unhealed[7], rel=1e-5)  # the unhealed prediction, over budget
    assert plan.to_json()["healed_ppl_ratio"] == plan.healed_ppl_ratio
    options = _options(tmp_path, quality_budget=budget, heal="linear")
    assert _served_ratio(tiny_llama_dir, options, plan.pruned) == pytest.approx(plan.healed_ppl_ratio, rel=1e-4)


def test_a_heal_that_makes_validation_worse_steps_the_plan_down(tiny_llama_dir, tmp_path, measured):
    unhealed, healed = measured
    assert unhealed[6] < healed[6] and healed[5] < unhealed[6]  # this seeded model: the heal hurts 6
    budget = (unhealed[6] + healed[6]) / 2  # the unhealed walk says 6; healed, 6 is over and 5 fits
    plan = _healed_plan(tiny_llama_dir, tmp_path, budget)
    assert plan.binding_target == "quality_budget" and len(plan.pruned) == 5
    assert plan.healed_ppl_ratio == pytest.approx(healed[5], rel=1e-5)


def test_with_a_latency_budget_the_healed_ratio_decides_whether_it_binds(tiny_llama_dir, tmp_path, measured):
    unhealed, healed = measured
    budget = (healed[7] + unhealed[7]) / 2  # the latency plan (7 pruned) is over it unhealed, within healed
    options = _options(tmp_path, latency_budget="0.95", quality_budget=budget, heal="linear")
    plan = make_plan(tiny_llama_dir, options, progress=False)
    assert plan.binding_target == "latency_budget" and len(plan.pruned) == 7
    assert plan.healed_ppl_ratio == pytest.approx(healed[7], rel=1e-5)
    assert plan.quality_ppl_ratio == pytest.approx(unhealed[7], rel=1e-5)


def test_second_healed_plan_fits_and_measures_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    options = _options(tmp_path, quality_budget=1.05, heal="linear", method="mi-prun")  # a score cache
    first = make_plan(tiny_llama_dir, options, progress=False)
    stored = score_cache.read_cache(first.cache_path).quality
    assert stored[validation_setup(options.calibration, "linear")]  # healed NLLs, under the recipe's key
    assert validation_setup(options.calibration, "linear") != validation_setup(options.calibration)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached plan fitted or measured")

    monkeypatch.setattr(heal, "fit_maps", forbidden)
    monkeypatch.setattr(BlockwiseModel, "__init__", forbidden)
    second = make_plan(tiny_llama_dir, options, progress=False)
    assert dataclasses.replace(second, scores_source=first.scores_source) == first
    assert second.healed_ppl_ratio is not None
    assert min(first.pruned) > 0  # a map folded into a kept block's down_proj, not the embedding
    assert not heal.needs_fit(tiny_llama_dir, options, list(first.kept), 8)  # the loader reads the stored maps
    assert _served_ratio(tiny_llama_dir, options, first.pruned) == pytest.approx(second.healed_ppl_ratio, rel=1e-4)
