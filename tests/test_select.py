"""Selection: objective, exact DP, Fast-Block-Select, baselines, keep ratio, protect."""

import itertools
import math

import numpy as np
import pytest

from vllm_miprun.core.selection import (
    METHODS,
    Selection,
    dpi_violations,
    exact_select,
    fast_block_select,
    keep_count,
    maximal_runs,
    mi_guided_greedy,
    mi_prun_search,
    objective_value,
    parse_protect,
    portfolio_refine,
    prune_count,
    random_dpi_cost,
    select,
    select_angular,
    select_last,
    select_random,
    select_shortgpt,
    select_sleb,
    swap_refine,
)
from vllm_miprun.core.selection.sleb import prefix_answers


def brute_force(cost, k, protect=frozenset()):
    num_blocks = cost.shape[0] - 1
    free = [b for b in range(num_blocks) if b not in protect]
    return min(objective_value(cost, p) for p in itertools.combinations(free, k))


def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# --------------------------------------------------------------------------- objective


def test_maximal_runs_merge_adjacent_blocks():
    assert maximal_runs([5, 1, 2, 7, 6]) == ((1, 3), (5, 8))
    assert maximal_runs([]) == ()


def test_adjacent_cheap_singles_are_scored_as_one_expensive_run():
    # Blocks 1 and 2 are cheap alone but expensive together; block 4 costs a bit more.
    L = 6
    cost = np.full((L + 1, L + 1), np.nan)
    for i in range(L):
        for j in range(i + 1, L + 1):
            cost[i, j] = 10.0 * (j - i)
    cost[1, 2] = cost[2, 3] = 0.1
    cost[4, 5] = 0.5
    cost[1, 3] = 5.0
    assert dpi_violations(cost) == 0
    assert objective_value(cost, [1, 2]) == 5.0  # not 0.2
    for solver in (exact_select, fast_block_select):
        chosen = solver(cost, 2)
        assert chosen.pruned == (1, 4) or chosen.pruned == (2, 4)
        assert close(chosen.objective, 0.6)


def test_random_instances_obey_dpi_and_are_not_additive():
    rng = np.random.default_rng(0)
    for kind in ("channels", "mixed", "planted"):
        cost = random_dpi_cost(16, rng, kind)
        assert dpi_violations(cost) == 0
        singles = np.array([cost[b, b + 1] for b in range(16)])
        assert not np.allclose(cost[0, 16], singles.sum())


# --------------------------------------------------------------------------- exact


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 8, 10])
def test_exact_matches_brute_force_for_every_k(num_blocks):
    rng = np.random.default_rng(num_blocks)
    for _ in range(3):
        cost = random_dpi_cost(num_blocks, rng)
        for k in range(num_blocks):
            assert close(exact_select(cost, k).objective, brute_force(cost, k))


@pytest.mark.parametrize("protect", [{0}, {9}, {0, 9}, {3, 4}, {2, 5, 7}])
def test_exact_matches_brute_force_with_protect(protect):
    rng = np.random.default_rng(7)
    cost = random_dpi_cost(10, rng)
    for k in range(10 - len(protect) + 1):
        if k > 9:
            continue
        chosen = exact_select(cost, k, protect)
        assert not set(chosen.pruned) & protect
        assert len(chosen.pruned) == k
        assert close(chosen.objective, brute_force(cost, k, protect))


def test_exact_ties_prefer_lexicographically_smallest():
    cost = np.full((7, 7), np.nan)
    for i in range(6):
        for j in range(i + 1, 7):
            cost[i, j] = float(j - i)  # additive and flat: every 2-set ties at 2
    assert exact_select(cost, 2).pruned == (0, 1)
    cost[0, 2] = 3.0  # merging 0 and 1 now costs more, so (0, 2) is the smallest optimum
    cost[0, 3:] = np.maximum(cost[0, 3:], 3.0)
    assert dpi_violations(cost) == 0
    assert exact_select(cost, 2).pruned == (0, 2)


# --------------------------------------------------------------------------- Fast-Block-Select


@pytest.mark.parametrize("num_blocks", [12, 24, 32])
def test_fast_block_select_reaches_the_optimum_with_fewer_reads(num_blocks):
    rng = np.random.default_rng(100 + num_blocks)
    instances = 30
    hits, fbs_reads, exact_reads = 0, 0, 0
    for _ in range(instances):
        cost = random_dpi_cost(num_blocks, rng)
        k = int(rng.integers(1, num_blocks // 2 + 1))
        fast = fast_block_select(cost, k)
        best = exact_select(cost, k)
        hits += close(fast.objective, best.objective) or fast.objective < best.objective
        fbs_reads += fast.run_evaluations
        exact_reads += best.run_evaluations
        assert len(fast.pruned) == k
    assert hits == instances  # every instance exact (the certificate proves it; no slack)
    assert fbs_reads < exact_reads
    assert fbs_reads < math.comb(num_blocks, num_blocks // 4) * instances


def test_fast_block_select_finds_a_planted_cheap_run_of_expensive_blocks():
    rng = np.random.default_rng(3)
    for _ in range(10):
        cost = random_dpi_cost(24, rng, "planted")
        for k in (3, 6, 8):
            assert close(fast_block_select(cost, k).objective, exact_select(cost, k).objective)


def test_fast_block_select_respects_protect_and_is_deterministic():
    rng = np.random.default_rng(5)
    cost = random_dpi_cost(20, rng)
    protect = frozenset({0, 19, 7})
    first = fast_block_select(cost, 8, protect)
    second = fast_block_select(cost.copy(), 8, protect)
    assert first == second
    assert not set(first.pruned) & protect
    assert close(first.objective, exact_select(cost, 8, protect).objective)


def test_fast_block_select_without_certificate_still_returns_a_valid_set():
    rng = np.random.default_rng(6)
    cost = random_dpi_cost(24, rng)
    chosen = fast_block_select(cost, 9, certify=False)
    assert len(chosen.pruned) == 9
    assert chosen.details["certified_optimal"] is False
    assert chosen.objective >= exact_select(cost, 9).objective - 1e-9


def test_zero_pruned_keeps_everything():
    cost = random_dpi_cost(6, np.random.default_rng(0))
    for solver in (exact_select, fast_block_select):
        chosen = solver(cost, 0)
        assert chosen.pruned == () and chosen.kept == tuple(range(6)) and chosen.objective == 0.0


def test_selection_to_json_round_trips_the_sets():
    cost = random_dpi_cost(10, np.random.default_rng(1))
    data = fast_block_select(cost, 3).to_json()
    assert sorted(data["kept"] + data["pruned"]) == list(range(10))
    assert data["method"] == "mi-prun" and data["num_blocks"] == 10
    assert isinstance(data["run_evaluations"], int)


def test_cost_matrix_errors():
    with pytest.raises(ValueError, match="square"):
        exact_select(np.zeros((3, 4)), 1)
    bad = random_dpi_cost(5, np.random.default_rng(0))
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fast_block_select(bad, 2)
    one = random_dpi_cost(5, np.random.default_rng(0))
    one[2, 3] = np.inf  # a single block's own cost, on the first superdiagonal
    with pytest.raises(ValueError, match="finite"):
        fast_block_select(one, 2)


def test_dpi_violations_counts_each_entry_below_either_sub_run():
    size = 5
    cost = np.zeros((size, size))
    for i in range(size):
        for j in range(i + 1, size):
            cost[i, j] = (j - i) + 0.1 * j  # monotone in both directions: no violation
    assert dpi_violations(cost) == 0
    cost[0, 2] = 1.15  # above cost[0, 1] = 1.1, below the right sub-run cost[1, 2] = 1.2
    assert dpi_violations(cost) == 1
    cost[0, 4] = 3.0  # a longer run below both of its sub-runs (3.3 and 3.4)
    assert dpi_violations(cost) == 2


# --------------------------------------------------------------------------- baselines


def test_shortgpt_removes_lowest_influence_ties_by_index():
    bi = [0.5, 0.1, 0.3, 0.1, 0.9]
    assert select_shortgpt(bi, 2).pruned == (1, 3)
    assert select_shortgpt(bi, 2, {3}).pruned == (1, 2)


def test_angular_picks_the_closest_run_avoiding_protected():
    L = 6
    ang = np.full((L + 1, L + 1), 0.9)
    ang[1, 3] = 0.1
    ang[3, 5] = 0.2
    assert select_angular(ang, 2).pruned == (1, 2)
    assert select_angular(ang, 2, {2}).pruned == (3, 4)
    with pytest.raises(ValueError, match="consecutive"):
        select_angular(ang, 3, {2, 4})


def test_last_prunes_before_the_final_block():
    assert select_last(10, 3).pruned == (6, 7, 8)
    assert select_last(10, 3, {7}).pruned == (5, 6, 8)
    assert select_last(4, 3, {0}).pruned == (1, 2, 3)


def test_random_is_seeded():
    a = select_random(20, 5, {0}, seed=3)
    assert a == select_random(20, 5, {0}, seed=3)
    assert 0 not in a.pruned and len(a.pruned) == 5


def test_sleb_is_greedy_and_counts_calls():
    weights = [5.0, 1.0, 3.0, 1.0, 2.0]

    def evaluate(pruned):
        return sum(weights[b] for b in pruned)

    chosen = select_sleb(5, 2, evaluate=evaluate)
    assert chosen.pruned == (1, 3)  # tie between 1 and 3 goes to 1 first
    assert chosen.run_evaluations == 5 + 4
    assert chosen.details["trace"][0]["block"] == 1
    with pytest.raises(ValueError, match="evaluate"):
        select_sleb(5, 2)


def test_sleb_trace_prefixes_are_its_answers_for_smaller_counts():
    cost = random_dpi_cost(10, np.random.default_rng(4))

    def evaluate(pruned):
        return objective_value(cost, pruned)

    deep = select_sleb(10, 5, {0}, evaluate=evaluate)
    answers = prefix_answers(deep)
    assert sorted(answers) == [1, 2, 3, 4, 5] and answers[5] == list(deep.pruned)
    for count in range(1, 5):
        assert answers[count] == list(select_sleb(10, count, {0}, evaluate=evaluate).pruned)
    assert prefix_answers(select_sleb(10, 0, evaluate=evaluate)) == {}


def test_mi_prun_search_keeps_the_proposal_with_the_lowest_loss():
    # The loss disagrees with the span cost: it punishes block 2 heavily, which the cost likes.
    L = 10
    cost = random_dpi_cost(L, np.random.default_rng(7))
    calls = []

    def loss(pruned):
        calls.append(pruned)
        return objective_value(cost, pruned) + (100.0 if 2 in pruned else 0.0)

    chosen = mi_prun_search(loss, cost, 3, protect={0}, candidates=2)
    scores = chosen.details["scores"]
    assert set(scores) == {"greedy", "span_fbs_p1", "span_fbs_p2"}
    assert scores[chosen.details["chosen"]]["pruned"] == list(chosen.pruned)
    assert all(scores[chosen.details["chosen"]]["loss"] <= s["loss"] for s in scores.values())
    assert chosen.run_evaluations == len({frozenset(s["pruned"]) for s in scores.values()})
    assert 0 not in chosen.pruned and all(0 not in p for p in calls)
    greedy = mi_guided_greedy(loss, cost, 3, {0}, candidates=2)
    assert scores["greedy"]["pruned"] == list(greedy.pruned)
    assert chosen.details["greedy_trace"] == greedy.details["trace"]
    assert mi_prun_search(loss, cost, 0).pruned == ()


def test_mi_guided_greedy_ranks_by_span_cost_then_by_the_pruned_models_noise_past_the_drift():
    cost = random_dpi_cost(12, np.random.default_rng(3))
    ranked_for = []

    def block_noise(pruned):  # the pruned model's noise ranks blocks in index order
        ranked_for.append(set(pruned))
        return [float(b) for b in range(12)]

    def loss(pruned):  # block 8 is the best removal; each removal costs 0.6 nats
        return 0.6 * len(pruned) + sum(-0.1 if b == 8 else 0.001 * b for b in pruned)

    def span_cost_top3(pruned):
        base = objective_value(cost, pruned) if pruned else 0.0
        free = [b for b in range(12) if b not in pruned]
        return sorted(free, key=lambda b: (objective_value(cost, pruned | {b}) - base, b))[:3]

    greedy = mi_guided_greedy(loss, cost, 3, candidates=3, block_noise=block_noise, wide_candidates=8, drift=1.0)
    trace = greedy.details["trace"]
    first, second = trace[0]["block"], trace[1]["block"]
    assert 8 not in span_cost_top3(set()) + span_cost_top3({first})  # only a wide round can find block 8
    # rounds 1-2 start below 1 nat (0, then 0.6): the span cost's top 3; round 3 starts past it
    assert [t["tried"] for t in trace[:2]] == [span_cost_top3(set()), span_cost_top3({first})]
    free = [b for b in range(12) if b not in (first, second)]
    assert trace[2]["tried"] == free[:8] and trace[2]["block"] == 8  # the noise's top 8 of 10 free blocks
    assert ranked_for == [{first, second}]  # re-measured only once drifted, on the set pruned so far
    narrow = mi_guided_greedy(loss, cost, 3, candidates=3, block_noise=block_noise, drift=float("inf"))
    assert 8 not in narrow.pruned  # never widened: block 8 is never measured
    # the rule reads only the set so far, so a smaller count is still a prefix of the trace
    assert mi_guided_greedy(loss, cost, 2, candidates=3, block_noise=block_noise).pruned == tuple(sorted((first, second)))


def test_mi_guided_greedy_resumes_a_known_trace_with_the_same_answer_and_fewer_measurements():
    cost = random_dpi_cost(12, np.random.default_rng(5))
    measured = []

    def loss(pruned):  # drifts past 1 nat at the third removal, so wide rounds are resumed too
        measured.append(pruned)
        return 0.45 * len(pruned) + sum(0.01 * ((b * 7) % 12) for b in pruned)

    def block_noise(pruned):
        return [float((b * 5 + len(pruned)) % 12) for b in range(12)]

    def greedy(count, known=()):
        measured.clear()
        return mi_guided_greedy(loss, cost, count, {0}, block_noise=block_noise, known=known)

    def rounds(selection):
        return [(step["block"], step["loss"], step["tried"]) for step in selection.details["trace"]]

    order = [step["block"] for step in greedy(6).details["trace"]]
    for count in (2, 4, 6):  # a prefix of the known order: only the set it reaches is measured
        fresh = greedy(count)
        resumed = greedy(count, known=order)
        assert measured == [frozenset(), frozenset(order[:count])]
        assert resumed.pruned == fresh.pruned == tuple(sorted(order[:count]))
        assert [step["block"] for step in resumed.details["trace"]] == order[:count]
    longer = greedy(8)
    fresh_measured = len(measured)
    resumed = greedy(8, known=order)  # past the known rounds the search goes on as it would have
    assert resumed.pruned == longer.pruned and rounds(resumed)[6:] == rounds(longer)[6:]
    assert len(rounds(resumed)[6][2]) == 5 and len(measured) < fresh_measured / 2  # wide: all 5 free blocks
    with pytest.raises(ValueError, match="distinct unprotected blocks"):
        mi_guided_greedy(loss, cost, 3, {0}, known=[0, 4])


def test_dispatcher_runs_every_method():
    L = 8
    rng = np.random.default_rng(2)
    cost = random_dpi_cost(L, rng)
    inputs = dict(
        cost=cost,
        block_influence=rng.uniform(size=L),
        angular=rng.uniform(size=(L + 1, L + 1)),
        evaluate=lambda p: float(sum(p)),
        protect=parse_protect("first,last", L),
    )
    for method in METHODS:
        chosen = select(method, L, 3, **inputs)
        assert isinstance(chosen, Selection) and chosen.method == method
        assert len(chosen.pruned) == 3 and not {0, L - 1} & set(chosen.pruned)
        assert chosen.objective == pytest.approx(objective_value(cost, chosen.pruned))
    assert select("mi-prun", L, 3, cost=cost).objective == pytest.approx(exact_select(cost, 3).objective)


def test_dispatcher_errors():
    cost = random_dpi_cost(8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mi-prun, shortgpt"):
        select("blockpruner", 8, 2, cost=cost)
    with pytest.raises(ValueError, match="0..7"):
        select("last", 8, 8)
    with pytest.raises(ValueError, match="0..7"):
        select("last", 8, -1)
    with pytest.raises(ValueError, match="needs cost"):
        select("mi-prun", 8, 2)
    with pytest.raises(ValueError, match="out of range"):
        select("last", 8, 2, protect={8})
    with pytest.raises(ValueError, match="only 2 prunable"):
        select("last", 8, 3, protect=set(range(6)))
    with pytest.raises(ValueError, match="recalibrate"):
        select("shortgpt", 8, 2, block_influence=np.ones(7))


# --------------------------------------------------------------------------- keep ratio, protect


@pytest.mark.parametrize(
    "ratio, num_blocks, expected",
    [
        (0.9, 30, 27),
        (0.75, 30, 23),  # 22.5 rounds up
        (0.5, 30, 15),
        (0.7, 30, 21),  # 20.999... is float noise for 21
        (1.0, 30, 30),
        (0.01, 30, 1),  # never zero kept
        (1e-9, 5, 1),
        (0.5, 5, 3),  # 2.5 rounds up
        (0.3, 5, 2),
        (0.58, 25, 15),  # 14.499999999999998 + 0.5: float noise for 14.5, which rounds up
        (0.7, 45, 32),  # 31.499999999999996 likewise
    ],
)
def test_keep_count_rounding_table(ratio, num_blocks, expected):
    assert keep_count(ratio, num_blocks) == expected
    assert prune_count(ratio, num_blocks) == num_blocks - expected


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, float("nan"), float("inf"), "abc", "0.5", None, True])
def test_keep_count_errors(ratio):
    with pytest.raises(ValueError, match="keep ratio"):
        keep_count(ratio, 30)


def test_keep_count_error_message_says_what_to_do():
    with pytest.raises(ValueError, match=r"got 1.5; pass e.g."):
        keep_count(1.5, 30)
    with pytest.raises(ValueError, match="number of blocks"):
        keep_count(0.5, 0)


def test_parse_protect():
    assert parse_protect("first,last", 30) == {0, 29}
    assert parse_protect("first", 30) == {0}
    assert parse_protect(" last , 3", 30) == {29, 3}
    assert parse_protect([0, "last"], 30) == {0, 29}
    assert parse_protect(5, 30) == {5}
    assert parse_protect("", 30) == frozenset()
    assert parse_protect(None, 30) == frozenset()
    for bad in ("middle", "30", "-1", [1.5], {"a": 1}):
        with pytest.raises(ValueError, match="protect"):
            parse_protect(bad, 30)


def test_one_block_model_is_served_whole_without_calibrating(tiny_llama_dir, tmp_path, caplog):
    """Nothing can be pruned from one block (at least one is kept): any target serves it
    whole, with one warning, and nothing is calibrated or searched; drop is still refused."""
    import logging

    from tiny_models import make_tiny_model
    from vllm_miprun.options import MiprunOptions, OptionError
    from vllm_miprun.pipeline.plan import make_plan

    # after tiny_llama_dir, the test tokenizer is trained: this model takes milliseconds
    model_dir = make_tiny_model(tmp_path / "one", num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1)
    cache_dir = tmp_path / "cache"
    for target in ({"keep": 0.5}, {"keep": 0.1, "method": "sleb"}, {"latency_budget": 0.5}):
        with caplog.at_level(logging.WARNING, logger="vllm_miprun.pipeline.plan"):
            plan = make_plan(model_dir, MiprunOptions.from_dict({**target, "cache_dir": str(cache_dir)}))
        assert (plan.kept, plan.pruned, plan.scores_source) == ((0,), (), "none-needed")
    warnings = [r.getMessage() for r in caplog.records if "one decoder block" in r.getMessage()]
    assert len(warnings) == 3 and warnings[0].endswith("nothing can be pruned, so it is served whole")
    assert not list(cache_dir.glob("*.json")) if cache_dir.exists() else True  # no score cache
    with pytest.raises(OptionError, match="drop names all 1 blocks"):
        make_plan(model_dir, MiprunOptions.from_dict({"drop": "0"}))


# --------------------------------------------------------------------------- search edges
# Cases a mutation pass found untested: each fails with the rule it names broken.


def test_swap_refine_never_swaps_in_a_protected_block():
    cost = random_dpi_cost(8, np.random.default_rng(2))
    measured = []

    def loss(pruned):  # pruning block 0 would be best by far
        measured.append(pruned)
        return (-10.0 if 0 in pruned else 0.0) + 0.01 * sum(pruned)

    result = swap_refine(loss, cost, 3, protect={0, 7})
    assert not ({0, 7} & set(result.pruned)) and all(not ({0, 7} & set(p)) for p in measured)


def test_swap_refine_moves_only_on_a_strictly_lower_loss():
    cost = random_dpi_cost(8, np.random.default_rng(2))
    result = swap_refine(lambda pruned: 1.0, cost, 3)
    assert result.pruned == exact_select(cost, 3).pruned and len(result.details["trace"]) == 1


def test_portfolio_refine_breaks_a_tie_by_the_smaller_set():
    result = portfolio_refine(lambda pruned: 2.0, {"later": (5, 6), "earlier": (1, 6)}, 8)
    assert result.pruned == (1, 6) and result.details["chosen"] == "earlier"


def test_greedy_keeps_the_best_ranked_block_on_a_tie():
    cost = random_dpi_cost(8, np.random.default_rng(4))
    trace = mi_guided_greedy(lambda pruned: 0.0, cost, 3).details["trace"]
    assert all(step["block"] == step["tried"][0] for step in trace)


def test_greedy_drift_is_measured_from_the_full_models_own_loss():
    """A loss offset (a CE objective: the full model's loss is not 0) changes no round."""
    cost = random_dpi_cost(12, np.random.default_rng(3))

    def kl(pruned):
        return 0.4 * len(pruned) + sum(0.01 * ((b * 7) % 12) for b in pruned)

    def noise(pruned):
        return [float((b * 5) % 12) for b in range(12)]

    plain = mi_guided_greedy(kl, cost, 4, block_noise=noise).details["trace"]
    offset = mi_guided_greedy(lambda p: kl(p) + 3.0, cost, 4, block_noise=noise).details["trace"]
    assert [(s["block"], s["tried"]) for s in offset] == [(s["block"], s["tried"]) for s in plain]
    assert len(plain[0]["tried"]) == 3 and len(plain[-1]["tried"]) == 8  # narrow, then past 1 nat, wide


def test_mi_prun_search_proposes_the_span_cost_optima_at_each_power():
    cost = random_dpi_cost(10, np.random.default_rng(4))  # a cost whose optima differ by power
    scores = mi_prun_search(lambda pruned: float(sum(pruned)), cost, 4).details["scores"]
    positive = np.clip(cost, 0.0, None)
    assert scores["span_fbs_p1"]["pruned"] == list(fast_block_select(positive ** 0.5, 4).pruned)
    assert scores["span_fbs_p2"]["pruned"] == list(fast_block_select(positive, 4).pruned)
    assert scores["span_fbs_p1"]["pruned"] != scores["span_fbs_p2"]["pruned"]


def test_fast_block_select_answers_without_a_certificate_or_runs_to_try():
    cost = random_dpi_cost(6, np.random.default_rng(0))
    assert fast_block_select(cost, 4, certify=False, top_runs=0).pruned == exact_select(cost, 4).pruned


@pytest.mark.parametrize("seed", range(6))
def test_fast_block_select_is_exact_on_negative_costs(seed):
    """Costs below zero (a shifted objective) still get the certified optimum."""
    cost = random_dpi_cost(8, np.random.default_rng(seed)) - 0.3
    for k in (2, 3, 5):
        assert close(objective_value(cost, fast_block_select(cost, k).pruned), brute_force(cost, k))



def test_baselines_break_ties_low_and_reach_block_zero():
    assert select_shortgpt([0.1, 0.1, 0.5], 1).pruned == (0,)  # tied influence: the lower index goes
    assert select_last(3, 2).pruned == (0, 1)  # the last block is kept, so pruning 2 of 3 reaches block 0


def test_baselines_refuse_scores_that_are_not_finite():
    with pytest.raises(ValueError, match="finite"):
        select_shortgpt([0.1, float("nan"), 0.3], 1)
    ang = np.full((5, 5), 0.5)
    ang[1, 3] = np.nan
    with pytest.raises(ValueError, match="recalibrate"):
        select_angular(ang, 2)


def test_a_score_vector_for_another_model_is_refused():
    with pytest.raises(ValueError, match="5 rows but 4 blocks need 4"):
        select("shortgpt", 4, 1, block_influence=[0.1] * 5)


# --------------------------------------------------------------------------- make_plan's checks


def _plan_options(tmp_path, **extra):
    from vllm_miprun.options import MiprunOptions

    return MiprunOptions.from_dict({"samples": 4, "seq_len": 32, "device": "cpu", "cache_dir": str(tmp_path),
                                    **extra})


def test_a_plans_keep_ratio_counts_the_kept_blocks(tiny_llama_dir, tmp_path):
    from vllm_miprun.pipeline.plan import make_plan

    plan = make_plan(tiny_llama_dir, _plan_options(tmp_path, keep=0.75, method="last"))
    assert (len(plan.kept), plan.keep_ratio) == (6, 0.75)


def test_a_config_override_of_the_block_count_is_checked(tiny_llama_dir, tmp_path):
    """hf_overrides can change num_hidden_layers: zero is refused in one line, and a score cache
    of the checkpoint's 8 blocks is refused for 6 instead of planning from the wrong scores."""
    import json

    from vllm_miprun.options import OptionError
    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.pipeline.store import CacheError

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(OptionError, match="num_hidden_layers as a positive integer, got 0"):
        make_plan(tiny_llama_dir, _plan_options(tmp_path, keep=0.5, method="last"),
                  hf_config={**config, "num_hidden_layers": 0})
    options = _plan_options(tmp_path, keep=0.5, method="shortgpt")
    make_plan(tiny_llama_dir, options, progress=False)
    with pytest.raises(CacheError, match="scores 8 blocks but the model has 6"):
        make_plan(tiny_llama_dir, options, hf_config={**config, "num_hidden_layers": 6}, progress=False)
