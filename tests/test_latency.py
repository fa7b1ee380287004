"""Latency model, budgets, and latency-budget selection."""

import numpy as np
import pytest

from vllm_miprun.core import latency
from vllm_miprun.core.latency import (
    LatencyModel,
    decode_step_costs,
    ideal_speedup,
    kv_bytes_per_token_per_block,
    mean_decode_context,
    parse_latency_budget,
)
from vllm_miprun.core.selection import (
    latency_floor,
    max_keep_for_budget,
    random_dpi_cost,
    select_for_latency,
)

LLAMA_LIKE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "num_hidden_layers": 30,
    "tie_word_embeddings": True,
}


SMOL_BLOCK_PARAMS = 2 * 576 * 9 * 64 + 2 * 576 * 3 * 64 + 3 * 576 * 1536  # q,o + k,v + gate,up,down


def test_step_costs_arithmetic_on_smollm2():
    costs = decode_step_costs(LLAMA_LIKE, batch_size=1, context_tokens=0)
    assert costs["block_params"] == SMOL_BLOCK_PARAMS == 3_538_944
    assert costs["lm_head_params"] == 49152 * 576
    assert costs["block_flops"] == 2 * SMOL_BLOCK_PARAMS and costs["rest_flops"] == 2 * 49152 * 576
    four = decode_step_costs(LLAMA_LIKE, batch_size=4, context_tokens=100, bytes_per_param=2)
    # FLOPs scale with the batch, weight reads do not; each sequence reads its own KV cache
    assert four["block_flops"] == 4 * (2 * SMOL_BLOCK_PARAMS + 4 * 100 * 9 * 64)
    assert four["block_bytes"] == SMOL_BLOCK_PARAMS * 2 + 4 * 100 * kv_bytes_per_token_per_block(LLAMA_LIKE, 2)
    assert four["rest_bytes"] == 49152 * 576 * 2
    # an explicit head_dim (Qwen3, Gemma) sizes the projections, not hidden_size / heads
    wide = decode_step_costs({**LLAMA_LIKE, "head_dim": 128}, batch_size=1, context_tokens=10)
    assert wide["block_params"] == 2 * 576 * 9 * 128 + 2 * 576 * 3 * 128 + 3 * 576 * 1536
    assert wide["block_flops"] == 2 * wide["block_params"] + 4 * 10 * 9 * 128
    # a one-byte cache (fp8 weights and KV): the KV reads shrink with the weights
    one = decode_step_costs(LLAMA_LIKE, batch_size=4, context_tokens=100, bytes_per_param=1)
    assert one["block_bytes"] == SMOL_BLOCK_PARAMS + 4 * 100 * kv_bytes_per_token_per_block(LLAMA_LIKE, 1)
    # a text_config that is not the language model's (no num_hidden_layers) is not read
    assert decode_step_costs({**LLAMA_LIKE, "text_config": {"hidden_size": 64}}) == decode_step_costs(LLAMA_LIKE)


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"])
def test_a_config_size_of_zero_is_refused_naming_it(key):
    with pytest.raises(ValueError, match=f"model config '{key}' must be a positive integer, got 0"):
        decode_step_costs({**LLAMA_LIKE, key: 0})


def test_estimate_is_the_roofline_of_the_step_costs():
    model = LatencyModel.from_config(LLAMA_LIKE, batch_size=8, context_tokens=300)
    costs = decode_step_costs(LLAMA_LIKE, batch_size=8, context_tokens=300)
    block = max(costs["block_flops"] / latency.DEFAULT_PEAK_FLOPS, costs["block_bytes"] / latency.DEFAULT_BANDWIDTH)
    head = max(costs["rest_flops"] / latency.DEFAULT_PEAK_FLOPS, costs["rest_bytes"] / latency.DEFAULT_BANDWIDTH)
    assert model.block_s == (pytest.approx(block),) * 30
    assert model.fixed_s == pytest.approx(head + latency.DEFAULT_STEP_OVERHEAD_S)
    assert model.details["context_tokens"] == 300


def test_one_default_workload_for_planner_and_ideal():
    assert (latency.DEFAULT_BATCH_SIZE, latency.DEFAULT_CONTEXT_TOKENS) == (1, 512)
    default = LatencyModel.from_config(LLAMA_LIKE)
    assert default.batch_size == 1 and default.details["context_tokens"] == 512
    explicit = LatencyModel.from_config(LLAMA_LIKE, batch_size=1, context_tokens=512)
    assert default == explicit
    for kept in (30, 23, 15, 1):
        assert ideal_speedup(LLAMA_LIKE, kept)["estimate"] == pytest.approx(default.speedup(range(kept)))
    one_byte = LatencyModel.from_config(LLAMA_LIKE, bytes_per_param=1)
    assert one_byte.speedup(range(15)) != pytest.approx(default.speedup(range(15)), rel=1e-3)
    assert ideal_speedup(LLAMA_LIKE, 15, bytes_per_param=1)["estimate"] == pytest.approx(one_byte.speedup(range(15)))


def test_ideal_speedup_ratios_on_smollm2():
    ideal = ideal_speedup(LLAMA_LIKE, 23, batch_size=1, context_tokens=0)
    head = 49152 * 576
    assert ideal["flops"] == pytest.approx((head + 30 * SMOL_BLOCK_PARAMS) / (head + 23 * SMOL_BLOCK_PARAMS))
    assert 1.2 < ideal["flops"] < 1.3  # the LM head is ~8 blocks' worth: far below 30/23
    # the planner's estimate adds a per-step overhead, so it stays below the ceiling
    assert 1.0 < ideal["estimate"] < ideal["flops"]
    assert ideal_speedup(LLAMA_LIKE, 30) == {"flops": pytest.approx(1.0), "bytes": pytest.approx(1.0),
                                             "estimate": pytest.approx(1.0)}
    # attention over a longer context adds per-block work only: the ideal rises
    assert ideal_speedup(LLAMA_LIKE, 15, context_tokens=2048)["flops"] > ideal_speedup(LLAMA_LIKE, 15)["flops"]
    # at batch 1 weights dominate both counts, so the two ceilings agree closely
    small = ideal_speedup(LLAMA_LIKE, 15, batch_size=1, context_tokens=64)
    assert small["bytes"] == pytest.approx(small["flops"], rel=0.02)
    for bad in (0, 31, 2.5, True):
        with pytest.raises(ValueError, match="block count in 1..30"):
            ideal_speedup(LLAMA_LIKE, bad)


def test_mean_decode_context():
    assert mean_decode_context(64, 128) == 128
    assert mean_decode_context(32, 17) == 40


def test_planner_predicts_what_the_benchmark_ideal_estimates(tiny_llama_dir, tmp_path):
    """No profile: the plan's predicted speed-up (exported as miprun_predicted_speedup) is
    the one model's estimate at the default workload."""
    import json

    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": 0.5, "method": "last",
                                                              "cache_dir": str(tmp_path)}))
    assert plan.latency_source == "flop-byte-estimate"
    assert plan.predicted_speedup == pytest.approx(ideal_speedup(config, len(plan.kept))["estimate"])
    assert plan.predicted_speedup > 1.0


def test_a_plan_predicts_from_a_measured_profile_in_the_sidecar_or_the_score_cache(tiny_llama_dir, tmp_path):
    """A score-free plan reads the weights' speed sidecar; a scored plan reads its score cache's profile."""
    from vllm_miprun.core.profile_fit import make_profile
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline import store
    from vllm_miprun.pipeline.calibrate import calibrate
    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.pipeline.speed_store import read_profile, store_speed

    profile = make_profile(8, 1, [(8, 0.010), (4, 0.006)])
    sidecar = tmp_path / "sidecar"
    store_speed(tiny_llama_dir, sidecar, profile=profile)
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": 0.5, "method": "last",
                                                              "cache_dir": str(sidecar)}))
    assert plan.latency_source == "profile"
    assert plan.predicted_speedup == LatencyModel.from_profile(profile).speedup(plan.kept)

    scored = tmp_path / "scored"
    options = MiprunOptions.from_dict({"keep": 0.5, "method": "shortgpt", "samples": 4, "seq_len": 32,
                                       "device": "cpu", "cache_dir": str(scored)})
    path = calibrate(tiny_llama_dir, options.calibration, cache_dir=scored, progress=False).path
    store.update_cache(path, lambda cache: setattr(cache, "profile", profile))
    assert read_profile(tiny_llama_dir, scored) is None  # no sidecar here
    plan = make_plan(tiny_llama_dir, options, progress=False)
    assert plan.latency_source == "profile"
    assert plan.predicted_speedup == LatencyModel.from_profile(profile).speedup(plan.kept)


def test_flop_model_speedup_grows_and_is_bounded_by_the_ideal_form():
    model = LatencyModel.from_config(LLAMA_LIKE, batch_size=16)
    assert model.source == "flop-byte-estimate" and model.num_blocks == 30
    fixed_in_blocks = model.fixed_s / model.block_s[0]
    previous = 1.0
    for keep in range(30, 0, -1):
        speedup = model.speedup(range(keep))
        assert speedup >= previous
        ideal = (30 + fixed_in_blocks) / (keep + fixed_in_blocks)
        assert speedup == pytest.approx(ideal)
        assert speedup <= 30 / keep + 1e-12
        previous = speedup
    assert model.speedup(range(30)) == pytest.approx(1.0)


def test_flop_model_uses_head_dim_and_batch_size():
    small = LatencyModel.from_config(LLAMA_LIKE, batch_size=1)
    wide = LatencyModel.from_config({**LLAMA_LIKE, "head_dim": 128}, batch_size=1)
    assert wide.block_s[0] > small.block_s[0]
    big_batch = LatencyModel.from_config(LLAMA_LIKE, batch_size=256)
    assert big_batch.block_s[0] > small.block_s[0]  # KV reads and FLOPs grow with batch
    with pytest.raises(ValueError, match="hidden_size"):
        LatencyModel.from_config({k: v for k, v in LLAMA_LIKE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="batch size"):
        LatencyModel.from_config(LLAMA_LIKE, batch_size=0)


def test_profile_round_trip_and_errors():
    profile = {"batch_size": 8, "fixed_s": 0.002, "block_s": [0.001, 0.002, 0.003], "device": "cpu"}
    model = LatencyModel.from_profile(profile)
    assert model.source == "profile"
    assert model.predict([0, 2]) == pytest.approx(0.006)
    assert model.speedup([0, 2]) == pytest.approx(0.008 / 0.006)
    assert LatencyModel.from_profile(model.to_profile()) == model
    assert model.to_profile()["device"] == "cpu"
    with pytest.raises(ValueError, match="block_s"):
        LatencyModel.from_profile({"batch_size": 1, "fixed_s": 0.0})
    with pytest.raises(ValueError, match="block_s"):
        LatencyModel.from_profile({"batch_size": 1, "fixed_s": 0.0, "block_s": [0.1, -1]})
    for outside in (3, -1):
        with pytest.raises(ValueError, match=r"0\.\.2, got \[-?\d\]"):
            model.predict([outside])
    for block_s in ((), (0.001, True)):
        with pytest.raises(ValueError, match="block_s must be one finite cost"):
            LatencyModel(fixed_s=0.001, block_s=block_s)
    with pytest.raises(ValueError, match="fixed_s must be a finite number"):
        LatencyModel(fixed_s=True, block_s=(0.001,))
    with pytest.raises(ValueError, match="batch size must be a positive integer, got True"):
        LatencyModel.from_profile({**profile, "batch_size": True})
    for block_s in (None, 5, "fast"):  # a profile file's wrong type: a ValueError, not a TypeError
        with pytest.raises(ValueError, match="block_s"):
            LatencyModel.from_profile({**profile, "block_s": block_s})
    with pytest.raises(ValueError, match="fixed_s must be a finite number"):
        LatencyModel.from_profile({**profile, "fixed_s": 10**400})  # beyond float range: no OverflowError
    assert model.budget_seconds("0.5") == 0.5 * model.full_s  # a fraction of the whole, fixed cost included


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0.8", ("fraction", 0.8, None)),
        (0.5, ("fraction", 0.5, None)),
        ("1", ("fraction", 1.0, None)),
        ("12ms", ("ms", 12.0, 1)),
        ("12.5ms@bs8", ("ms", 12.5, 8)),
        (" 3 MS @ BS 16 ", ("ms", 3.0, 16)),
    ],
)
def test_parse_latency_budget(spec, expected):
    assert parse_latency_budget(spec) == expected


@pytest.mark.parametrize("spec", ["0", "1.2", "-0.5", "nan", "abc", "12s", "0ms", "1e999ms", "12ms@bs0", None, True])
def test_parse_latency_budget_errors(spec):
    with pytest.raises(ValueError, match="budget|batch size"):
        parse_latency_budget(spec)


def test_latency_budget_plan_meets_its_own_prediction():
    model = LatencyModel.from_config(LLAMA_LIKE, batch_size=16)
    cost = random_dpi_cost(30, np.random.default_rng(0))
    for budget in ("0.9", "0.8", "0.6"):
        for method in ("mi-prun", "last", "random"):
            chosen = select_for_latency(method, budget, model, cost=cost)
            assert chosen.details["predicted_latency_s"] <= float(budget) * model.full_s + 1e-12
            assert model.predict(chosen.kept) == pytest.approx(chosen.details["predicted_latency_s"])
            # Homogeneous blocks: the largest K that fits, so one more block would not fit.
            assert model.predict(range(len(chosen.kept) + 1)) > float(budget) * model.full_s


def test_heterogeneous_blocks_walk_down_until_the_budget_fits():
    block_s = [0.001] * 8
    block_s[3] = 0.003  # the most influential block is also the slowest
    model = LatencyModel.from_profile({"batch_size": 1, "fixed_s": 0.001, "block_s": block_s})
    influence = [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.7]
    assert max_keep_for_budget(model, 0.008) == 7  # fixed + the 7 cheap blocks
    chosen = select_for_latency("shortgpt", "8ms", model, block_influence=influence)
    # K=7 and K=6 keep block 3 and miss the budget; K=5 is the first that fits.
    assert 3 in chosen.kept and len(chosen.kept) == 5
    assert model.predict(chosen.kept) <= 0.008 + 1e-12
    with pytest.raises(ValueError, match="no last selection meets"):
        select_for_latency("last", "2.5ms", LatencyModel.from_profile(
            {"batch_size": 1, "fixed_s": 0.001, "block_s": [0.001] * 3 + [0.01]}))


def test_budget_below_the_floor_names_the_floor():
    model = LatencyModel.from_profile({"batch_size": 4, "fixed_s": 0.004, "block_s": [0.001] * 10})
    assert latency_floor(model) == pytest.approx(0.005)
    with pytest.raises(ValueError, match=r"below the floor 5\.0000 ms per token at batch size 4"):
        select_for_latency("last", "4.5ms@bs4", model)
    with pytest.raises(ValueError, match=r"floor 0\.3571 of the full"):
        select_for_latency("last", "0.3", model)
    with pytest.raises(ValueError, match=r"floor 0\.4286 of the full model's latency \(fixed cost plus the protected"):
        select_for_latency("last", "0.4", model, protect={0, 9})
    with pytest.raises(ValueError, match="batch size 1"):
        select_for_latency("last", "8ms", model)


def test_ms_budget_selection_is_deterministic():
    model = LatencyModel.from_config(LLAMA_LIKE, batch_size=1)
    cost = random_dpi_cost(30, np.random.default_rng(1))
    budget = f"{model.full_s * 1000 * 0.75:.3f}ms"
    a = select_for_latency("mi-prun", budget, model, cost=cost, protect={0})
    b = select_for_latency("mi-prun", budget, model, cost=cost, protect={0})
    assert a == b and 0 in a.kept


def test_a_budget_for_exactly_one_block_keeps_one_block():
    """The walk down from the largest K reaches K = 1 (a mutation pass found it never had to)."""
    model = LatencyModel.from_profile({"batch_size": 1, "fixed_s": 0.001, "block_s": [0.001] * 6})
    chosen = select_for_latency("last", "2ms", model)
    assert len(chosen.kept) == 1 and model.predict(chosen.kept) <= 0.002 + 1e-12


def test_protected_blocks_count_in_the_largest_keep_for_a_budget():
    model = LatencyModel.from_profile({"batch_size": 1, "fixed_s": 0.001, "block_s": [0.001] * 8})
    assert max_keep_for_budget(model, 0.005) == 4
    assert max_keep_for_budget(model, 0.005, protect={0, 7}) == 4  # the 2 protected plus 2 others
