"""The quality budget: the walk, the option, the validation text, plans on a tiny model, caching.

The tiny random models' ratios are not monotone in the number pruned, so the plan tests
derive their budgets from ratios measured on the same model instead of fixed numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from vllm_miprun.core.gains import kv_bytes_per_token_saved
from vllm_miprun.core.selection.quality import most_pruned_within
from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.options import MiprunOptions, OptionError
from vllm_miprun.pipeline import corpora
from vllm_miprun.pipeline import store as score_cache
from vllm_miprun.pipeline.calibrate import load_tokenizer
from vllm_miprun.pipeline.plan import make_plan
from vllm_miprun.pipeline.quality import QualityProbe, validation_ids
from vllm_miprun.tools.evaluate import TransformersBackend, perplexity
from vllm_miprun.tools import cli
from vllm_miprun.vllm import metrics

SMALL = {"samples": 4, "seq_len": 32, "device": "cpu"}


# --- the walk (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("budget, expected", [(1.3, 4), (1.29, 4), (1.2, 3), (1.04, 0), (10.0, 7), (2.0, 6)])
def test_walk_picks_the_largest_count_within_budget(budget, expected):
    ratios = [1.0, 1.05, 1.1, 1.2, 1.29, 1.31, 2.0, 5.0]  # grows with the count, as for real selectors
    asked = []

    def ratio_for(count):
        asked.append(count)
        return ratios[count]

    walk = most_pruned_within(budget, 7, ratio_for)
    assert walk.num_prune == expected
    assert walk.ratio == ratios[expected]  # measured (1.0 for the dense model, never measured)
    assert expected == 7 or walk.ratios[expected + 1] > budget  # one more block was measured over budget
    assert 0 not in asked  # the dense model is free
    assert max(asked) <= max(1, 2 * expected)  # never far past the answer: those counts cost the most
    assert len(asked) <= 2 * math.ceil(math.log2(expected + 1)) + 1


def test_walk_refuses_a_negative_count():
    with pytest.raises(ValueError, match="max_prune must be >= 0, got -1"):
        most_pruned_within(1.2, -1, lambda count: 1.0)


def test_stored_ratio_of_far_apart_nlls_is_infinite_not_an_overflow():
    """A cache's NLLs are finite, but their difference can overflow exp (a tampered file)."""
    from vllm_miprun.pipeline.quality import set_key, stored_ratio

    assert stored_ratio({set_key(()): 0.0, set_key([1]): 1e30}, [1]) == math.inf
    assert stored_ratio({set_key(()): 2.0, set_key([1]): 2.0}, [1]) == 1.0


def test_walk_measures_few_counts_and_none_far_past_the_answer():
    ratios = [1.0] + [1.0 + 0.01 * n for n in range(1, 30)]  # 29 blocks prunable, 3 within budget
    asked = []
    walk = most_pruned_within(1.035, 29, lambda n: asked.append(n) or ratios[n])
    assert walk.num_prune == 3 and asked == [1, 2, 4, 3]


def test_walk_matches_brute_force_on_random_monotone_ratios():
    rng = np.random.default_rng(0)
    for _ in range(200):
        max_prune = int(rng.integers(0, 40))
        ratios = np.concatenate([[1.0], 1.0 + np.cumsum(rng.exponential(0.1, max_prune))])
        budget = float(rng.uniform(1.0, ratios[-1] + 0.2))
        best = max(n for n in range(max_prune + 1) if ratios[n] <= budget)
        asked = []
        assert most_pruned_within(budget, max_prune, lambda n: asked.append(n) or ratios[n]).num_prune == best
        assert all(count <= max(1, 2 * best) for count in asked) and len(asked) == len(set(asked))


# --- the option --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "1.0", 0.9, "nan", "inf", float("inf"), "fast", True, None, [1.3]])
def test_quality_budget_must_be_a_finite_number_above_one(value):
    with pytest.raises(OptionError) as err:
        MiprunOptions.from_dict({"quality_budget": value if value is not None else "", "method": "last"})
    message = str(err.value)
    assert "\n" not in message and "quality_budget must be a finite number > 1" in message
    assert repr(value if value is not None else "") in message


def test_quality_budget_joins_only_a_latency_budget():
    assert MiprunOptions.from_dict({"quality_budget": "1.3"}).quality_budget == 1.3
    both = MiprunOptions.from_dict({"quality_budget": 1.3, "latency_budget": "0.8"})
    assert (both.quality_budget, both.latency_budget) == (1.3, "0.8")
    for other in ({"keep": 0.5}, {"drop": "3"}):
        with pytest.raises(OptionError, match="not both"):
            MiprunOptions.from_dict({"quality_budget": 1.3, **other})
    assert MiprunOptions.from_dict({"quality_budget": 1.3, "heal": "linear"}).heal == "linear"  # measured healed


def test_bad_budget_is_refused_before_the_model_is_read(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", str(missing), "--quality-budget", "0.8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "quality_budget must be a finite number > 1, got '0.8'" in err
    assert "no-such-model" not in err


# --- the validation text -----------------------------------------------------------------


def _ngrams(rows: np.ndarray, n: int = 12) -> set:
    return {tuple(row[i:i + n]) for row in rows.tolist() for i in range(len(row) - n + 1)}


def test_validation_text_is_calibration_text_that_calibration_never_reads(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    for dataset in ("wiki", "c4"):
        calibration = corpora.sample_token_windows(tokenizer, dataset, 32, 64, seed=0)
        validation = corpora.validation_token_windows(tokenizer, dataset, 32, 64, 0, 8, 64)
        evaluation = corpora.sample_token_windows(tokenizer, dataset, 8, 64, seed=0, part="evaluation")
        assert validation.shape == (8, 64)
        assert not _ngrams(validation) & _ngrams(calibration)
        assert not _ngrams(validation) & _ngrams(evaluation)
        # deterministic, and another seed reads other documents
        assert (corpora.validation_token_windows(tokenizer, dataset, 32, 64, 0, 8, 64) == validation).all()
        assert not (corpora.validation_token_windows(tokenizer, dataset, 32, 64, 1, 8, 64) == validation).all()


# --- plans on a tiny model ---------------------------------------------------------------


def _options(cache_dir, **extra):
    return MiprunOptions.from_dict({**SMALL, "cache_dir": str(cache_dir), **extra})


def _transformers_ratio(model_dir, options, kept) -> float:
    """The ratio through another code path: the Hugging Face model with blocks deleted."""
    windows = validation_ids(model_dir, options.calibration).numpy()
    dense = perplexity(TransformersBackend(model_dir), windows)["ppl"]
    return perplexity(TransformersBackend(model_dir, kept=kept), windows)["ppl"] / dense


def _fresh_ratio(model_dir, options, pruned) -> float:
    """The ratio measured from scratch: no cache, a new model."""
    return QualityProbe(model_dir, options, None, lambda: BlockwiseModel(model_dir)).ratio(pruned)


def test_quality_plan_is_within_budget_and_one_more_block_is_not(tiny_llama_dir, tmp_path):
    base = _options(tmp_path, method="last", keep=0.5)
    from vllm_miprun.core.selection import select_last

    ratios = {n: _fresh_ratio(tiny_llama_dir, base, select_last(8, n).pruned) for n in range(1, 8)}
    budget = ratios[7] - 1e-3  # all 7 do not fit; a bisection over the counts finds one that does
    assert budget > 1.0
    plan = make_plan(tiny_llama_dir, _options(tmp_path, method="last", quality_budget=budget))
    count = len(plan.pruned)
    assert plan.binding_target == "quality_budget" and 0 < count < 7
    assert plan.quality_ppl_ratio == pytest.approx(ratios[count], rel=1e-5) and plan.quality_ppl_ratio <= budget
    assert ratios[count + 1] > budget or count + 1 == 7
    assert plan.to_json()["quality_ppl_ratio"] == plan.quality_ppl_ratio
    assert _transformers_ratio(tiny_llama_dir, base, plan.kept) == pytest.approx(plan.quality_ppl_ratio, rel=1e-4)


def test_a_loose_budget_with_protect_prunes_every_unprotected_block(tiny_llama_dir, tmp_path):
    plan = make_plan(tiny_llama_dir, _options(tmp_path, method="last", quality_budget=1e9, protect="0,1"))
    assert plan.binding_target == "quality_budget" and plan.kept == (0, 1)


def test_with_a_latency_budget_the_binding_target_is_reported(tiny_llama_dir, tmp_path):
    fast = make_plan(tiny_llama_dir, _options(tmp_path, method="last", latency_budget="0.95"), measure_quality=True)
    assert fast.binding_target == "latency_budget" and len(fast.pruned) == 7
    ratio = fast.quality_ppl_ratio
    assert ratio > 1.01  # seven of eight blocks gone costs this random model some perplexity

    loose = make_plan(tiny_llama_dir, _options(tmp_path, method="last", latency_budget="0.95",
                                               quality_budget=ratio * 1.01))
    assert loose.binding_target == "latency_budget" and loose.pruned == fast.pruned
    assert loose.quality_ppl_ratio == pytest.approx(ratio)

    tight_budget = 1.0 + (ratio - 1.0) / 2
    tight = make_plan(tiny_llama_dir, _options(tmp_path, method="last", latency_budget="0.95",
                                               quality_budget=tight_budget))
    assert tight.binding_target == "quality_budget" and len(tight.pruned) < len(fast.pruned)
    assert tight.quality_ppl_ratio <= tight_budget
    assert tight.predicted_speedup < fast.predicted_speedup


def test_second_plan_is_a_cache_hit_without_a_forward_pass(tiny_llama_dir, tmp_path, monkeypatch):
    options = _options(tmp_path, quality_budget=1.05)  # the default method: MI-PRUN's forward search
    first = make_plan(tiny_llama_dir, options, progress=False)
    stored = score_cache.read_cache(first.cache_path).quality
    assert len(stored) == 1 and len(next(iter(stored.values()))) >= 2  # the dense model and the sets tried

    def no_model(*args, **kwargs):
        raise AssertionError("a cached plan loaded the model")

    monkeypatch.setattr(BlockwiseModel, "__init__", no_model)
    monkeypatch.setattr(BlockwiseModel, "run_block", no_model)
    second = make_plan(tiny_llama_dir, options, progress=False)
    assert second.scores_source == "cache-hit"
    assert dataclasses.replace(second, scores_source=first.scores_source) == first
    assert second.quality_ppl_ratio <= 1.05


def test_plan_command_prints_the_predicted_quality(tiny_llama_dir, tmp_path, capsys):
    args = ["plan", str(tiny_llama_dir), "--keep", "0.5", "--method", "last", "--cache-dir", str(tmp_path),
            "--samples", "4", "--seq-len", "32", "--device", "cpu"]
    from vllm_miprun.pipeline.calibrate import calibrate

    calibrate(tiny_llama_dir, _options(tmp_path, keep=0.5).calibration, cache_dir=tmp_path, progress=False)
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "predicted speed-up" in text and "predicted quality: perplexity x" in text
    # the KV saving is stated for the cache it assumes (the served metric uses the served dtype)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    per_token = kv_bytes_per_token_saved(config, config["num_hidden_layers"] // 2, 2)
    assert f"KV cache saved {per_token} bytes/token in a 16-bit cache (twice that in float32;" in text
    assert cli.main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["binding_target"] == "keep"
    assert plan["quality_ppl_ratio"] == pytest.approx(
        _fresh_ratio(tiny_llama_dir, _options(tmp_path, keep=0.5), plan["pruned"]), rel=1e-5)


# --- the metric --------------------------------------------------------------------------


def test_quality_metric_follows_the_plan_report(tiny_llama_dir, tmp_path, monkeypatch):
    from vllm_miprun.vllm import reports

    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path))
    kept = [0, 1, 2, 3, 4, 5]
    reports.publish({"kept": kept, "num_blocks": 8, "predicted_speedup": 1.2, "latency_source": "profile",
                     "scores_source": "cache-hit", "method": "last", "quality_ppl_ratio": 1.25,
                     "healed_ppl_ratio": 1.2, "binding_target": "quality_budget"})
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    exporter = metrics.Exporter("quality-test", tiny_llama_dir, config, kept, 8, 2, cache_dir=str(tmp_path))
    exporter.publish_static()
    gauge = metrics.gauges()["miprun_quality_ppl_ratio"]
    assert gauge.labels(model_name="quality-test", binding_target="quality_budget")._value.get() == 1.25
    healed = metrics.gauges()["miprun_healed_ppl_ratio"]  # heal=linear: the served model's ratio too
    assert healed.labels(model_name="quality-test", binding_target="quality_budget")._value.get() == 1.2


# --- SmolLM2 -----------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_quality_plan_is_within_budget_on_held_out_text(smollm2_dir, tmp_path, capsys):
    """A real model: ShortGPT's sets (no forward search, to stay short) under budget 1.5."""
    args = ["plan", str(smollm2_dir), "--quality-budget", "1.5", "--method", "shortgpt", "--samples", "4",
            "--seq-len", "128", "--cache-dir", str(tmp_path), "--device", "cpu", "--json"]
    options = MiprunOptions.from_dict({"method": "shortgpt", "samples": 4, "seq_len": 128, "keep": 0.5})
    from vllm_miprun.pipeline.calibrate import calibrate

    calibrate(smollm2_dir, options.calibration, cache_dir=tmp_path, progress=False)
    assert cli.main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["binding_target"] == "quality_budget" and 1 <= len(plan["pruned"]) < 29
    assert 1.0 < plan["quality_ppl_ratio"] <= 1.5
    # measured again through the Hugging Face model with the blocks deleted
    assert _transformers_ratio(smollm2_dir, options, plan["kept"]) == pytest.approx(plan["quality_ppl_ratio"],
                                                                                      rel=1e-3)


def test_a_plan_that_measures_nothing_reports_the_quality_a_plan_command_stored(tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    """`vllm serve --miprun-keep` after `vllm-miprun plan --keep`: the served plan's
    miprun_quality_ppl_ratio is the one `plan` printed, read from the score cache, not NaN."""
    options = _options(tmp_path, keep=0.5, method="shortgpt")  # reads scores, so a score cache holds ratios
    assert make_plan(tiny_llama_dir, options).quality_ppl_ratio is None  # nothing stored yet
    measured = make_plan(tiny_llama_dir, options, measure_quality=True).quality_ppl_ratio
    assert measured is not None and measured != 1.0  # a random tiny model: either side of 1
    monkeypatch.setattr(QualityProbe, "_evaluate", lambda self: pytest.fail("a stored ratio was measured again"))
    assert make_plan(tiny_llama_dir, options).quality_ppl_ratio == measured
    other = make_plan(tiny_llama_dir, _options(tmp_path, keep=0.75, method="shortgpt"))
    assert other.quality_ppl_ratio is None  # other blocks: not stored, and not measured
