"""MI-PRUN's default search on a tiny model: Fast-Block-Select proposals arbitrated by the
next-token MI bound on calibration tokens, cached in the score cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.pipeline.store import read_cache, update_cache
from vllm_miprun.pipeline.calibrate import calibrate, calibration_ids
from vllm_miprun.core.span_cost import monotone_closure, span_cost_matrix
from vllm_miprun.options import CalibrationSettings, MiprunOptions
from vllm_miprun.pipeline.forward_search import GREEDY_TRACE_KEY, SELECTION_KEYS, ForwardSearch
from vllm_miprun.pipeline.plan import make_plan
from vllm_miprun.pipeline.refine import CalibrationCE, CalibrationKL, refine
from vllm_miprun.core.selection import dpi_violations

SMALL = CalibrationSettings(samples=4, seq_len=32)


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("scores")
    return calibrate(tiny_llama_dir, SMALL, cache_dir=cache_dir, progress=False), cache_dir


def test_span_cost_is_monotone_and_uses_skip_mi(calibrated):
    result, _ = calibrated
    cost = span_cost_matrix(result.cache)
    assert cost.shape == (9, 9)
    assert dpi_violations(cost) == 0
    assert np.all(cost[np.triu_indices(9, 1)] >= 0)
    assert "skip_mi_iso" in result.cache.baselines


def test_renyi_cache_is_priced_by_its_own_span_mi(tiny_llama_dir, tmp_path):
    from vllm_miprun.core.span_cost import mi_fallback_cost, skip_cost
    from vllm_miprun.core.matrices import from_nested_list

    renyi = calibrate(tiny_llama_dir, CalibrationSettings(samples=4, seq_len=32, estimator="renyi"),
                      cache_dir=tmp_path, progress=False).cache
    cost = span_cost_matrix(renyi)
    expected = mi_fallback_cost(from_nested_list(renyi.span_scores))
    np.testing.assert_allclose(cost, expected, equal_nan=True)
    skip = skip_cost(from_nested_list(renyi.baselines["skip_mi_iso"]), renyi.model["hidden_size"])
    assert not np.allclose(np.nan_to_num(cost), np.nan_to_num(skip))


def test_monotone_closure_repairs_violations():
    raw = np.full((4, 4), np.nan)
    raw[0, 1], raw[1, 2], raw[2, 3], raw[0, 2], raw[1, 3], raw[0, 3] = 0.5, 0.2, 0.3, 0.1, 0.4, 0.2
    fixed = monotone_closure(raw)
    assert dpi_violations(fixed) == 0 and dpi_violations(raw) > 0
    assert fixed[0, 2] == 0.5 and fixed[0, 3] == 0.5


# A skip-channel MI already monotone under the DPI (a longer run keeps less), so the closure
# leaves each cost at its closed form: {(i, j): I_skip(h_i; h_j)} on 3 blocks, d = 8.
SKIP_MI = {(0, 1): 4.0, (1, 2): 3.0, (2, 3): 5.0, (0, 2): 2.0, (1, 3): 1.5, (0, 3): 1.0}


def _span_matrix(values):
    out = np.full((4, 4), np.nan)
    for (i, j), value in values.items():
        out[i, j] = value
    return out


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_span_costs_are_their_closed_forms(power):
    import math
    from types import SimpleNamespace

    from vllm_miprun.core.matrices import to_nested_list
    from vllm_miprun.core.span_cost import mi_fallback_cost, skip_cost

    skip = _span_matrix(SKIP_MI)
    cost = skip_cost(skip, 8, power)
    fallback = mi_fallback_cost(skip, power)
    for (i, j), value in SKIP_MI.items():
        assert cost[i, j] == pytest.approx(math.exp(-2.0 * value / 8) ** power, rel=1e-12)
        assert fallback[i, j] == pytest.approx((1.0 - value / 5.0) ** power, rel=1e-12, abs=1e-15)
    assert np.isnan(cost[np.tril_indices(4)]).all() and np.isnan(fallback[np.tril_indices(4)]).all()
    cache = SimpleNamespace(baselines={"skip_mi_iso": to_nested_list(skip)}, span_scores=to_nested_list(2 * skip),
                            estimator={"name": "gaussian"}, model={"hidden_size": 8})
    np.testing.assert_array_equal(span_cost_matrix(cache, power), cost)
    cache.estimator = {}  # a cache that names no estimator is a Gaussian one
    np.testing.assert_array_equal(span_cost_matrix(cache, power), cost)
    cache.model = {}
    with pytest.raises(ValueError, match="no model.hidden_size; recalibrate"):
        span_cost_matrix(cache, power)


def test_span_matrices_keep_float64_and_store_only_the_upper_triangle():
    from vllm_miprun.core.matrices import from_nested_list, to_nested_list

    rows = to_nested_list(np.arange(9.0).reshape(3, 3) + 0.1)
    assert rows == [[None, 1.1, 2.1], [None, None, 5.1], [None, None, None]]
    back = from_nested_list(rows)
    assert back.dtype == np.float64 and float(back[0, 1]) == 1.1 and np.isnan(back[1, 1])


def test_refine_picks_the_proposal_with_the_best_bound(tiny_llama_dir, calibrated):
    result, _ = calibrated
    cost = span_cost_matrix(result.cache)
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    selection = refine(tiny_llama_dir, ids, cost, 3, model=model)
    assert len(selection.pruned) == 3 and len(selection.kept) == 5
    scores = selection.details["scores"]
    chosen = scores[selection.details["chosen"]]
    assert sorted(selection.pruned) == chosen["pruned"]
    assert all(chosen["loss"] <= other["loss"] for other in scores.values())
    assert selection.details["objective"] == "kl"  # the default: KL to the full model
    evaluate = CalibrationKL(model, ids)
    assert evaluate(frozenset(selection.pruned)) == pytest.approx(chosen["loss"], rel=1e-6)
    hard = refine(tiny_llama_dir, ids, cost, 3, model=model, objective="ce")
    hard_scores = hard.details["scores"]
    assert CalibrationCE(model, ids)(frozenset(hard.pruned)) == pytest.approx(
        hard_scores[hard.details["chosen"]]["loss"], rel=1e-6)


def test_kl_objective_is_zero_for_the_full_model_and_matches_its_definition(tiny_llama_dir):
    import torch

    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    evaluate = CalibrationKL(model, ids)
    assert evaluate(frozenset()) == pytest.approx(0.0, abs=1e-6)
    pruned = frozenset({2, 5})
    h = model.forward_from(model.embed_tokens(ids), 0, pruned)
    p = torch.log_softmax(model.norm(evaluate.states[-1][:, :-1]) @ model.lm_head_weight.T, dim=-1)
    q = torch.log_softmax(model.norm(h[:, :-1]) @ model.lm_head_weight.T, dim=-1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected > 0
    assert evaluate(pruned) == pytest.approx(expected, rel=1e-5)
    # prefix reuse from a stored chain gives the same value as a fresh evaluator
    evaluate(frozenset({2}))
    assert evaluate(frozenset({2, 6})) == pytest.approx(CalibrationKL(model, ids)(frozenset({2, 6})), rel=1e-6)


def test_token_nll_is_the_mean_cross_entropy_of_each_next_token(tiny_llama_dir):
    """SLEB's loss: each position predicts the token after it, averaged over every predicted
    token, whatever the micro-batches (3 sequences in batches of 2)."""
    model = BlockwiseModel(tiny_llama_dir)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:3]
    final = model.forward_from(model.embed_tokens(ids), 0, frozenset({2, 5}))
    logits = model.norm(final[:, :-1]) @ model.lm_head_weight.T
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(model.token_nll(final, ids, batch_size=2)) == pytest.approx(float(expected), rel=1e-5)


def test_one_model_runs_windows_of_each_length_as_a_fresh_model_does(tiny_llama_dir):
    """The masks and rotary tables recorded for one window length are not reused for another."""
    model = BlockwiseModel(tiny_llama_dir)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    for length in (32, 20, 32):
        window = ids[:, :length]
        fresh = BlockwiseModel(tiny_llama_dir)
        expected = fresh.forward_from(fresh.embed_tokens(window), 0, frozenset({3}))
        assert torch.equal(model.forward_from(model.embed_tokens(window), 0, frozenset({3})), expected), length


def test_kl_with_the_teachers_stored_probabilities_is_the_same_to_the_last_bit(tiny_llama_dir):
    """The search's speed-up (the teacher's exponential kept) must not move a near-tie."""
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:3]
    dense = model.forward_from(model.embed_tokens(ids), 0)
    teacher = model.token_logprobs(dense, batch_size=2)
    pruned = model.forward_from(model.embed_tokens(ids), 0, frozenset({1, 4}))
    fresh = float(model.token_kl(teacher, pruned, batch_size=2))
    stored = model.teacher_probs(teacher, batch_size=2)
    assert fresh > 0 and float(model.token_kl(teacher, pruned, batch_size=2, teacher_probs=stored)) == fresh
    # by the batches token_kl reads, so no exp runs over a different span (a vector loop's
    # scalar tail could round its last elements differently on another CPU)
    assert torch.equal(stored[2:], teacher[2:].exp())


def test_stored_chains_are_evicted_least_recently_used_first(tiny_llama_dir):
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    evaluate = CalibrationKL(model, calibration_ids(tiny_llama_dir, SMALL)[:2], keep_chains=2)
    evaluate(frozenset({5}))
    evaluate(frozenset({6}))
    evaluate(frozenset({5, 7}))  # resumes from {5}'s states, so {6} is the least recently used
    passes = evaluate.block_passes
    evaluate.block_noise(frozenset({5}))  # a round's winner is read again: still stored
    assert evaluate.block_passes == passes
    evaluate.block_noise(frozenset({6}))  # evicted: measured again
    assert evaluate.block_passes == passes + 1  # block 7, from the full model's state at 6


def test_search_speedups_change_no_answer_and_the_benchmark_really_turns_them_off(calibrated, tiny_llama_dir):
    from benchmark_module import load_benchmark  # tests/ is on sys.path (conftest)

    bench = load_benchmark("search_speedups")
    result, _ = calibrated
    cost, ids = span_cost_matrix(result.cache), calibration_ids(tiny_llama_dir, SMALL)
    for method in ("mi-prun", "sleb"):
        shipped = bench.run_search(tiny_llama_dir, method, 4, cost, ids)
        with bench.without_speedups():
            before = bench.run_search(tiny_llama_dir, method, 4, cost, ids)
        assert shipped["pruned"] == before["pruned"]
        assert before["blocks_assigned"] == 0 and shipped["blocks_assigned"] > 0
        assert shipped["block_passes"] <= before["blocks_loaded"] == before["block_passes"]
        if method == "sleb":  # each round's base set stays stored while every block is tried: 89 vs 91 passes
            assert shipped["block_passes"] < before["block_passes"]
        assert shipped["blocks_loaded"] == shipped["block_passes"]  # on the CPU, no block stays resident


def test_sleb_trace_says_when_each_round_ended(tiny_llama_dir):
    import itertools
    import time

    from vllm_miprun.core.selection.sleb import prefix_answers
    from vllm_miprun.pipeline.refine import sleb

    ids = calibration_ids(tiny_llama_dir, SMALL)
    # A clock that ticks once per reading: the k-th evaluation ends at k, so each round's
    # stamp is its own last evaluation's count on any machine, however fast.
    ticks = itertools.count()
    counted = sleb(BlockwiseModel(tiny_llama_dir, resident_blocks=True), ids, 3, clock=lambda: float(next(ticks)))
    # 8 blocks: rounds of 8, 7 and 6 evaluations; each step is stamped after its own round
    assert [step["evaluations"] for step in counted.details["trace"]] == [8, 15, 21]
    assert [step["seconds"] for step in counted.details["trace"]] == [8.0, 15.0, 21.0]
    start = time.perf_counter()
    result = sleb(BlockwiseModel(tiny_llama_dir, resident_blocks=True), ids, 3)  # the real clock, in seconds
    elapsed = time.perf_counter() - start
    seconds = [step["seconds"] for step in result.details["trace"]]
    assert list(result.pruned) == list(counted.pruned)
    assert 0 <= seconds[0] <= seconds[1] <= seconds[2] <= elapsed + 1e-3
    shallow = sleb(BlockwiseModel(tiny_llama_dir, resident_blocks=True), ids, 2)
    assert list(shallow.pruned) == prefix_answers(result)[2]


def test_plan_time_benchmark_times_both_methods_and_reads_sleb_counts_from_one_run(tiny_llama_dir, tmp_path):
    import json

    from benchmark_module import load_benchmark

    bench = load_benchmark("plan_time")
    out = tmp_path / "plan_time.json"
    assert bench.main(["--model", str(tiny_llama_dir), "--keeps", "0.75,0.5", "--out-json", str(out),
                       "--out-png", str(tmp_path / "plan_time.png"), "--repeats", "3"]) == 0
    result = json.loads(out.read_text())
    rows = {row["keep"]: row for row in result["rows"]}
    assert result["warm_up_s"] > 0  # one-time costs paid before either side is timed
    for row in rows.values():  # the run of median seconds among the repeats is the one reported
        for side in ("mi_prun", "shortgpt"):
            assert len(row[side]["samples"]) == 3 and row[side]["seconds"] == sorted(row[side]["samples"])[1]
    assert [rows[k]["num_prune"] for k in (0.75, 0.5)] == [2, 4]
    for row in rows.values():  # each MI-PRUN plan calibrated from an empty folder, then searched
        assert 0 < row["mi_prun"]["calibration_s"] < row["mi_prun"]["seconds"]
        assert row["ratio_first_plan"] == pytest.approx(row["mi_prun"]["seconds"] / row["sleb"]["seconds"], abs=1e-3)
    assert rows[0.5]["sleb"]["seconds"] == pytest.approx(result["sleb_run_s"], abs=0.01)  # the run itself
    assert rows[0.75]["sleb"]["seconds"] < rows[0.5]["sleb"]["seconds"]  # less its two later rounds
    shallow = make_plan(tiny_llama_dir, MiprunOptions(keep=0.75, method="sleb", cache_dir=str(tmp_path / "sleb")),
                        progress=False)
    assert rows[0.75]["sleb"]["pruned"] == list(shallow.pruned)  # the deeper run's prefix is SLEB's own plan
    assert [len(rows[k]["mi_prun"]["pruned"]) for k in (0.75, 0.5)] == [2, 4]
    assert (tmp_path / "plan_time.png").stat().st_size > 0


def test_block_noise_is_the_skip_channel_noise_of_the_pruned_model(tiny_llama_dir):
    import torch

    from vllm_miprun.core.scoring import rms_normalise

    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    evaluate = CalibrationKL(model, ids, keep_chains=1)
    pruned = frozenset({2, 5})
    evaluate(pruned)
    passes = evaluate.block_passes
    noise = evaluate.block_noise(pruned)
    assert evaluate.block_passes == passes  # read from the states of the last measurement
    h = model.embed_tokens(ids)
    width = h.shape[-1]
    for b in range(model.num_blocks):
        if b in pruned:
            assert noise[b] == 0.0
            continue
        with model.block(b) as layer:
            after = model.run_block(layer, h)
        g_in, g_out = (rms_normalise(x.reshape(-1, width)) for x in (h, after))
        expected = float((g_out - g_in).pow(2).sum(1).mean() / g_out.var(dim=0).sum())
        assert noise[b] == pytest.approx(expected, rel=1e-6)
        h = after
    assert noise[6] != pytest.approx(evaluate.block_noise(frozenset())[6], rel=1e-3)  # not the full model's
    evaluate(frozenset({1}))  # keep_chains=1: the states of {2, 5} are dropped and measured again
    assert evaluate.block_noise(pruned) == pytest.approx(noise, rel=1e-6)
    # drifted from the start: the first round ranks all 8 blocks by the full model's noise
    tried = refine(tiny_llama_dir, ids, np.zeros((9, 9)), 3, model=model, drift=0.0).details["greedy_trace"][0]["tried"]
    full = evaluate.block_noise(frozenset())
    assert tried == sorted(range(8), key=lambda b: (full[b], b)) and tried != list(range(8))


def test_refine_rejects_an_unknown_objective(tiny_llama_dir, calibrated):
    result, _ = calibrated
    with pytest.raises(ValueError, match="objective must be one of ce, kl, got 'mse'"):
        refine(tiny_llama_dir, calibration_ids(tiny_llama_dir, SMALL)[:2], span_cost_matrix(result.cache), 3,
               objective="mse")


def test_mi_prun_plan_is_cached_and_reused(tiny_llama_dir, calibrated):
    result, cache_dir = calibrated
    options = MiprunOptions(keep=0.5, cache_dir=str(cache_dir), calibration=SMALL)
    first = make_plan(tiny_llama_dir, options, progress=False)
    assert first.method == "mi-prun" and len(first.kept) == 4
    stored = read_cache(result.path).selections[SELECTION_KEYS["mi-prun"]]["4"]
    assert stored == list(first.pruned)
    again = make_plan(tiny_llama_dir, options, progress=False)
    assert again.kept == first.kept and again.scores_source == "cache-hit"
    assert first.objective is not None and again.objective == first.objective  # J of the cached set, as computed
    # The stored answer is what later plans use: replace it and the plan follows.
    other = [b for b in range(8) if b not in first.pruned][:4]
    update_cache(result.path, lambda cache: cache.selections[SELECTION_KEYS["mi-prun"]].update({"4": other}))
    assert list(make_plan(tiny_llama_dir, options, progress=False).pruned) == sorted(other)


def test_an_answer_cached_by_an_older_mi_prun_default_is_not_reused(tiny_llama_dir, tmp_path):
    result = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    options = MiprunOptions(keep=0.5, cache_dir=str(tmp_path), calibration=SMALL)
    stale = [0, 1, 2, 3]  # what an earlier objective might have stored under the bare method name
    update_cache(result.path, lambda cache: cache.selections.setdefault("mi-prun", {}).update({"4": stale}))
    plan = make_plan(tiny_llama_dir, options, progress=False)
    assert SELECTION_KEYS["mi-prun"] != "mi-prun"
    assert read_cache(result.path).selections[SELECTION_KEYS["mi-prun"]]["4"] == list(plan.pruned)
    assert read_cache(result.path).selections["mi-prun"]["4"] == stale  # left alone, never read


def test_mi_prun_plan_resumes_the_greedy_order_a_deeper_plan_stored(tiny_llama_dir, tmp_path, caplog):
    def plan(keep, folder):
        options = MiprunOptions(keep=keep, cache_dir=str(tmp_path / folder), calibration=SMALL)
        return make_plan(tiny_llama_dir, options, progress=False)

    deep = plan(0.5, "resumed")
    path = deep.cache_path
    order = read_cache(path).selections[GREEDY_TRACE_KEY]["4"]
    assert len(set(order)) == 4 and deep.scores_source == "computed"
    with caplog.at_level(logging.INFO, logger="vllm_miprun.pipeline.forward_search"):
        shallow = plan(0.75, "resumed")
    assert "searched 2 blocks to prune" in caplog.text and "(2 greedy rounds taken from the score cache)" in caplog.text
    fresh = plan(0.75, "fresh")  # a cache without the order searches from the start
    assert shallow.pruned == fresh.pruned and shallow.quality_ppl_ratio == fresh.quality_ppl_ratio
    assert read_cache(fresh.cache_path).selections[GREEDY_TRACE_KEY]["2"] == order[:2]
    assert read_cache(path).selections[GREEDY_TRACE_KEY] == {"4": order}  # the longer order stays


def test_forward_search_reads_four_calibration_sequences_and_keeps_blocks_within_max_memory(tiny_llama_dir,
                                                                                          monkeypatch):
    """SLEB sees the first 4 calibration sequences however many are asked for, and the model
    it runs keeps blocks resident within the ``max_memory`` option (0 by default on the CPU)."""
    from vllm_miprun.pipeline import refine as refine_module

    options = MiprunOptions(keep=0.5, method="sleb", max_memory="1m",
                            calibration=CalibrationSettings(samples=6, seq_len=32))
    forward = ForwardSearch(tiny_llama_dir, options, None)
    model, ids = forward._load()
    assert torch.equal(ids, calibration_ids(tiny_llama_dir, options.calibration)[:4])
    assert model.resident_blocks and model.budget.max_memory == 1 << 20
    seen = []
    real = refine_module.sleb
    monkeypatch.setattr(refine_module, "sleb", lambda model, ids, *a, **k: seen.append(ids) or real(model, ids, *a, **k))
    assert len(forward.run("sleb", 8, 1, frozenset()).pruned) == 1
    assert len(seen) == 1 and torch.equal(seen[0], ids)


def test_a_calibration_hands_the_search_its_full_pass_to_the_bit(tiny_llama_dir, tmp_path, monkeypatch):
    """The calibration of a first MI-PRUN plan runs the first SEARCH_WINDOWS windows through
    each block as a batch of their own and keeps their states: the search's own full pass, to
    the last bit. A search handed them tokenises nothing, skips that pass (one block pass per
    block fewer) and finds the same blocks with the same losses as a search on its own."""
    from vllm_miprun.pipeline import forward_search
    from vllm_miprun.pipeline.calibrate import SEARCH_WINDOWS

    settings = CalibrationSettings(samples=6, seq_len=32)
    batches = []
    real_run_block = BlockwiseModel.run_block
    monkeypatch.setattr(BlockwiseModel, "run_block",
                        lambda self, layer, hidden, *a, **k: batches.append(hidden.shape[0])
                        or real_run_block(self, layer, hidden, *a, **k))
    result = calibrate(tiny_llama_dir, settings, cache_dir=tmp_path, progress=False, keep_search_start=True)
    assert batches == [SEARCH_WINDOWS, 6 - SEARCH_WINDOWS] * 8  # the search's batch apart, in every block
    start = result.search_start
    assert torch.equal(start.input_ids, calibration_ids(tiny_llama_dir, settings))
    own = CalibrationKL(BlockwiseModel(tiny_llama_dir), start.input_ids[:SEARCH_WINDOWS]).states
    assert len(start.states) == 9 and all(torch.equal(a, b) for a, b in zip(start.states, own))
    assert calibrate(tiny_llama_dir, settings, cache_dir=tmp_path, progress=False,
                     keep_search_start=True).search_start is None  # a cache read runs no pass

    options = MiprunOptions(keep=0.5, cache_dir=str(tmp_path), calibration=settings)
    cost = span_cost_matrix(result.cache)
    alone = ForwardSearch(tiny_llama_dir, options, cost)
    found_alone = alone.run("mi-prun", 8, 4, frozenset())
    monkeypatch.setattr(forward_search, "calibration_ids", lambda *a: pytest.fail("the search tokenised again"))
    handed = ForwardSearch(tiny_llama_dir, options, cost, start)
    found = handed.run("mi-prun", 8, 4, frozenset())
    assert found.pruned == found_alone.pruned
    assert [r["loss"] for r in found.details["greedy_trace"]] == [r["loss"] for r in found_alone.details["greedy_trace"]]
    assert alone._mi_prun_loss.block_passes - handed._mi_prun_loss.block_passes == 8


def test_a_first_mi_prun_plan_searches_from_its_calibration(tiny_llama_dir, tmp_path, monkeypatch):
    """``make_plan`` from an empty score cache hands the calibration it runs to the search
    (which would otherwise tokenise the calibration text again)."""
    from vllm_miprun.pipeline import forward_search

    monkeypatch.setattr(forward_search, "calibration_ids", lambda *a: pytest.fail("the search tokenised again"))
    plan = make_plan(tiny_llama_dir, MiprunOptions(keep=0.5, cache_dir=str(tmp_path), calibration=SMALL),
                     progress=False)
    assert len(plan.pruned) == 4 and plan.scores_source == "computed"


def test_sleb_plan_caches_every_prefix_of_its_greedy_trace(tiny_llama_dir, calibrated):
    result, cache_dir = calibrated
    deep = make_plan(tiny_llama_dir, MiprunOptions(keep=0.5, method="sleb", cache_dir=str(cache_dir),
                                                   calibration=SMALL), progress=False)
    stored = read_cache(result.path).selections["sleb"]
    assert sorted(stored) == ["1", "2", "3", "4"] and stored["4"] == list(deep.pruned)
    for count in range(1, 4):  # each greedy round extends the previous answer by one block
        assert set(stored[str(count)]) < set(stored[str(count + 1)]) and len(stored[str(count)]) == count
    shallow = make_plan(tiny_llama_dir, MiprunOptions(keep=0.75, method="sleb", cache_dir=str(cache_dir),
                                                      calibration=SMALL), progress=False)
    assert list(shallow.pruned) == stored["2"]


def test_a_plan_with_protected_blocks_neither_reads_nor_fills_the_cached_answers(tiny_llama_dir, calibrated):
    """Cached answers are for unprotected searches: a protected plan searches on its own and
    never prunes a protected block, even where the cache holds an answer for its count."""
    result, cache_dir = calibrated
    settings = dict(keep=0.875, method="sleb", cache_dir=str(cache_dir), calibration=SMALL)  # prune 1 of 8
    free = make_plan(tiny_llama_dir, MiprunOptions(**settings), progress=False)
    (block,) = free.pruned
    guarded = make_plan(tiny_llama_dir, MiprunOptions(**settings, protect=str(block)), progress=False)
    assert len(guarded.pruned) == 1 and block not in guarded.pruned
    assert read_cache(result.path).selections["sleb"]["1"] == [block]


def test_skip_mi_matches_its_definition():
    import torch

    from vllm_miprun.core.scoring import isotropic_skip_mi_matrix, rms_normalise

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(256, 32, generator=generator)
    states = [base + 0.3 * k * torch.randn(256, 32, generator=generator) for k in range(4)]
    matrix = isotropic_skip_mi_matrix(states)
    g = [rms_normalise(s) for s in states]
    for i in range(3):
        for j in range(i + 1, 4):
            signal = g[j].var(dim=0).sum()
            noise = (g[j] - g[i]).pow(2).mean(dim=0).sum()
            assert matrix[i, j] == pytest.approx(16 * float(torch.log(signal / noise)), rel=1e-10)
    assert matrix[0, 1] > matrix[0, 3]  # more added noise, less information survives the skip


def test_one_shared_evaluator_gives_every_count_a_fresh_evaluators_selection(tiny_llama_dir, calibrated):
    """A plan that searches several counts (quality bisection, latency walk) shares one
    evaluator: the same sets and losses as a fresh evaluator per count, for less work."""
    result, _ = calibrated
    cost = span_cost_matrix(result.cache)
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    shared = CalibrationKL(model, ids)
    fresh_passes = 0
    for count in (6, 3, 4):  # a bisection's order: the largest count first
        alone = refine(tiny_llama_dir, ids, cost, count, model=model)
        reused = refine(tiny_llama_dir, ids, cost, count, model=model, evaluator=shared)
        assert reused.pruned == alone.pruned, count
        assert reused.details["scores"] == alone.details["scores"], count  # the same numbers, bit for bit
        fresh_passes += alone.details["block_passes"]
    assert shared.block_passes < fresh_passes / 2  # one full pass, and the greedy prefixes measured once
    with pytest.raises(ValueError, match="must be a CalibrationKL on these calibration tokens"):
        refine(tiny_llama_dir, ids[:1], cost, 3, model=model, evaluator=shared)


def test_a_shared_evaluator_counts_only_new_work_and_must_match_the_objective(tiny_llama_dir, calibrated):
    result, _ = calibrated
    cost = span_cost_matrix(result.cache)
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    shared = CalibrationKL(model, ids)
    assert shared.block_passes == model.num_blocks  # the full pass
    assert CalibrationKL(model, ids, states=shared.states).block_passes == 0  # states given: no pass
    first = refine(tiny_llama_dir, ids, cost, 3, model=model, evaluator=shared)
    assert first.details["block_passes"] == shared.block_passes - model.num_blocks > 0
    again = refine(tiny_llama_dir, ids, cost, 3, model=model, evaluator=shared)
    assert again.pruned == first.pruned
    assert (again.details["block_passes"], again.run_evaluations) == (0, 0)  # every set from the memo
    with pytest.raises(ValueError, match="must be a CalibrationCE on these calibration tokens, got a CalibrationKL"):
        refine(tiny_llama_dir, ids, cost, 3, model=model, objective="ce", evaluator=shared)


def test_refine_and_sleb_never_prune_a_protected_block(tiny_llama_dir, calibrated):
    """Protect the blocks each search prunes unprotected: it must find two others."""
    from vllm_miprun.pipeline.refine import sleb

    result, _ = calibrated
    cost = span_cost_matrix(result.cache)
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:1]
    protect = set(refine(tiny_llama_dir, ids, cost, 2, model=model).pruned)
    guarded = refine(tiny_llama_dir, ids, cost, 2, protect=protect, model=model)
    assert len(guarded.pruned) == 2 and not protect & set(guarded.pruned)
    protect = set(sleb(model, ids, 2).pruned)
    guarded = sleb(model, ids, 2, protect=protect)
    assert len(guarded.pruned) == 2 and not protect & set(guarded.pruned)


def test_a_resumed_chain_holds_the_states_of_its_own_pruned_model(tiny_llama_dir):
    """A set measured from another set's stored states keeps that set's states before the
    resume point, not the full model's: the greedy reads its noise from them."""
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    evaluate = CalibrationKL(model, ids)
    evaluate(frozenset({2}))
    passes = evaluate.block_passes
    evaluate(frozenset({2, 5}))
    assert evaluate.block_passes == passes + 2  # resumed from {2}'s state at block 5: blocks 6 and 7
    fresh = CalibrationKL(model, ids, states=evaluate.states)
    assert evaluate.block_noise(frozenset({2, 5})) == pytest.approx(fresh.block_noise(frozenset({2, 5})), rel=1e-9)


def test_max_evaluations_caps_the_wide_rounds_too_and_excludes_a_known_trace(tiny_llama_dir):
    model = BlockwiseModel(tiny_llama_dir, resident_blocks=True)
    ids = calibration_ids(tiny_llama_dir, SMALL)[:2]
    capped = refine(tiny_llama_dir, ids, np.zeros((9, 9)), 2, model=model, drift=0.0, max_evaluations=2)
    assert [len(step["tried"]) for step in capped.details["greedy_trace"]] == [1, 1]  # drifted, still 1 a round
    with pytest.raises(ValueError, match="known .* or max_evaluations, not both"):
        refine(tiny_llama_dir, ids, np.zeros((9, 9)), 2, model=model, max_evaluations=2, known=[3])


def test_a_quality_budget_plan_is_the_same_with_and_without_the_shared_evaluator(tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    from dataclasses import replace

    from vllm_miprun.pipeline import forward_search, refine as refine_module

    built = []

    class Counted(CalibrationKL):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(refine_module, "CalibrationKL", Counted)
    monkeypatch.setitem(refine_module.OBJECTIVES, "kl", Counted)
    options = MiprunOptions(quality_budget=1.5, cache_dir=str(tmp_path / "shared"), calibration=SMALL)
    shared = make_plan(tiny_llama_dir, options, progress=False)
    assert len(built) == 1  # one full pass for every count the bisection searched
    # Without the speed-up: the search forgets its evaluator, so each count builds its own.
    monkeypatch.setattr(forward_search.ForwardSearch, "_mi_prun_loss", property(lambda self: None, lambda self, v: None),
                        raising=False)
    alone = make_plan(tiny_llama_dir, replace(options, cache_dir=str(tmp_path / "alone")), progress=False)
    assert len(built) - 1 >= 2, "the bisection searched one count only: the comparison shows nothing"
    assert (alone.kept, alone.quality_ppl_ratio) == (shared.kept, shared.quality_ppl_ratio)
