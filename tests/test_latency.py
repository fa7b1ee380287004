"""Latency model, budgets, and latency-budget selection."""

import numpy as np
import pytest

from vllm_miprun.core.latency import LatencyModel, parse_latency_budget
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
    with pytest.raises(ValueError, match="0..2"):
        model.predict([3])


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


@pytest.mark.parametrize("spec", ["0", "1.2", "-0.5", "nan", "abc", "12s", "0ms", "12ms@bs0", None, True])
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
