"""Config remapping, weight renaming, refusals, and reading only kept tensors (no engine)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from vllm_miprun.model import checkpoint, remap, weights
from vllm_miprun.options import OptionError


def _llama(num_layers: int = 8, **extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": num_layers, "hidden_size": 128, "eos_token_id": [1, 2], **extra}


def _qwen2(num_layers: int = 8, **extra) -> dict:
    return _llama(num_layers, architectures=["Qwen2ForCausalLM"], model_type="qwen2", **extra)


def test_remap_sets_layer_count_and_records_plan():
    new = remap.remap_config(_llama(), [0, 1, 2, 7])
    assert new["num_hidden_layers"] == 4
    assert new[remap.KEPT_FIELD] == [0, 1, 2, 7]
    assert new[remap.FULL_FIELD] == 8


def test_remap_slices_per_layer_lists_but_not_token_ids():
    types = [f"t{i}" for i in range(8)]
    new = remap.remap_config(_llama(2, eos_token_id=[1, 2], layer_types=types[:2]), [1])
    assert new["layer_types"] == ["t1"]
    assert new["eos_token_id"] == [1, 2]
    new = remap.remap_config(_llama(layer_types=types, my_per_layer=list(range(8))), [0, 3, 5])
    assert new["layer_types"] == ["t0", "t3", "t5"]
    assert new["my_per_layer"] == [0, 3, 5]


def test_config_overrides_holds_only_changed_fields():
    overrides = remap.config_overrides(_llama(), [0, 7])
    assert overrides == {"num_hidden_layers": 2, remap.KEPT_FIELD: [0, 7], remap.FULL_FIELD: 8}


def test_qwen2_max_window_layers_counts_kept_blocks_below_threshold():
    config = _qwen2(use_sliding_window=True, sliding_window=64, max_window_layers=4,
                    layer_types=["full_attention"] * 4 + ["sliding_attention"] * 4)
    new = remap.remap_config(config, [0, 2, 5, 7])
    assert new["max_window_layers"] == 2
    assert new["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_qwen2_without_sliding_window_still_renumbers_threshold():
    new = remap.remap_config(_qwen2(use_sliding_window=False, max_window_layers=28), [0, 7])
    assert new["max_window_layers"] == 2


def test_qwen2_inconsistent_layer_types_are_refused_naming_the_field():
    config = _qwen2(use_sliding_window=True, sliding_window=64, max_window_layers=4,
                    layer_types=["sliding_attention", "full_attention"] * 4)
    with pytest.raises(OptionError, match="max_window_layers"):
        remap.remap_config(config, [0, 1, 4])


@pytest.mark.parametrize("field, value", [
    ("first_k_dense_replace", 3), ("no_rope_layers", [1, 0] * 4),
    ("moe_layer_freq", 2), ("num_kv_shared_layers", 4),
])
def test_index_based_fields_are_refused_by_name(field, value):
    with pytest.raises(OptionError, match=field):
        remap.remap_config(_llama(**{field: value}), [0, 7])


def test_neutral_index_fields_are_accepted():
    new = remap.remap_config(_llama(first_k_dense_replace=0, num_kv_shared_layers=None), [0, 7])
    assert new["num_hidden_layers"] == 2


def test_unsupported_architecture_lists_the_supported_ones():
    config = _llama(architectures=["GPT2LMHeadModel"])
    with pytest.raises(OptionError) as error:
        remap.remap_config(config, [0])
    for arch in remap.SUPPORTED_ARCHITECTURES:
        assert arch in str(error.value)


@pytest.mark.parametrize("kept", [[], [0, 8], [3, 1], [1, 1], [-1], [True]])
def test_tampered_kept_indices_are_refused(kept):
    with pytest.raises(OptionError):
        remap.remap_config(_llama(), kept)


def test_already_pruned_config_is_refused():
    pruned = remap.remap_config(_llama(), [0, 7])
    with pytest.raises(OptionError, match="already pruned"):
        remap.remap_config(pruned, [0])


def _family(arch: str, model_type: str, num_layers: int = 8, **extra) -> dict:
    return _llama(num_layers, architectures=[arch], model_type=model_type, **extra)


def _qwen3_moe_kinds(config: dict) -> list[bool]:
    """Sparse or dense per block, by the rule transformers and vLLM apply."""
    from vllm_miprun.model.architectures.qwen3_moe import is_sparse

    step, mlp_only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers", []))
    return [is_sparse(i, mlp_only, step, config["num_experts"]) for i in range(config["num_hidden_layers"])]


@pytest.mark.parametrize("step, mlp_only, kept", [
    (1, [2, 5], [0, 2, 3, 5, 7]), (2, [0], [0, 1, 3]), (3, [], [1, 2, 4, 5, 7]), (2, [1, 3], [3, 4, 5]),
])
def test_qwen3_moe_kept_blocks_keep_their_kind(step, mlp_only, kept):
    config = _family("Qwen3MoeForCausalLM", "qwen3_moe", num_experts=4, decoder_sparse_step=step,
                     mlp_only_layers=mlp_only)
    new = remap.remap_config(config, kept)
    old_kinds = _qwen3_moe_kinds(config)
    assert _qwen3_moe_kinds(new) == [old_kinds[k] for k in kept]
    if step == 1:
        assert "decoder_sparse_step" not in remap.config_overrides(config, kept)  # minimal change


def test_deepseek_dense_prefix_is_renumbered_and_mtp_dropped():
    config = _family("DeepseekV3ForCausalLM", "deepseek_v3", first_k_dense_replace=3, num_nextn_predict_layers=1)
    new = remap.remap_config(config, [0, 2, 5, 7])
    assert new["first_k_dense_replace"] == 2 and new["num_nextn_predict_layers"] == 0
    assert remap.remap_config(config, [4, 5])["first_k_dense_replace"] == 0


def test_deepseek_moe_layer_freq_is_refused_naming_it():
    config = _family("DeepseekV2ForCausalLM", "deepseek_v2", first_k_dense_replace=1, moe_layer_freq=2)
    with pytest.raises(OptionError, match="moe_layer_freq=2"):
        remap.check_architecture(config)


def test_approximate_experts_follow_their_blocks_and_pruned_entries_go():
    # vLLM 0.33 substitutes the experts listed under a block's index in its MoE layer's name
    config = _family("Qwen3MoeForCausalLM", "qwen3_moe", num_experts=4,
                     approximate_experts={"1": [0, 2], "4": [3], "6": [1], "7": []})
    new = remap.remap_config(config, [0, 4, 5, 6])
    assert new["approximate_experts"] == {"1": [3], "3": [1]}  # block 4 is now 1, block 6 is now 3
    assert remap.config_overrides(config, [0, 4, 5, 6])["approximate_experts"] == {"1": [3], "3": [1]}
    assert remap.remap_config(config, [0, 2])["approximate_experts"] == {}  # no substituted expert kept


@pytest.mark.parametrize("value", [{"8": [0]}, {"-1": [0]}, {"x": [0]}, [[0]]])
def test_approximate_experts_outside_the_model_are_refused_naming_the_field(value):
    config = _family("MixtralForCausalLM", "mixtral", num_local_experts=4, approximate_experts=value)
    with pytest.raises(OptionError, match="approximate_experts"):
        remap.remap_config(config, [0, 1])


def test_llama4_moe_layers_are_renumbered_or_refused():
    config = _family("Llama4ForCausalLM", "llama4_text", interleave_moe_layer_step=2)  # MoE at 1, 3, 5, 7
    new = remap.remap_config(config, [0, 1, 4, 5])
    assert new["moe_layers"] == [1, 3] and new.get("interleave_moe_layer_step") == 2
    assert len(new["no_rope_layers"]) == 4 and len(new["layer_types"]) == 4  # derived, then sliced
    assert remap.remap_config(config, [1, 3])["interleave_moe_layer_step"] == 1
    with pytest.raises(OptionError, match="interleave_moe_layer_step"):
        remap.remap_config(config, [0, 2, 3])


def test_gemma2_layer_types_are_derived_when_config_json_omits_them():
    new = remap.remap_config(_family("Gemma2ForCausalLM", "gemma2", sliding_window=64), [0, 2, 3])
    assert new["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]


def test_every_family_is_in_the_one_table():
    from vllm_miprun.model import architectures

    assert set(remap.SUPPORTED_ARCHITECTURES) == set(architectures.BY_ARCHITECTURE)
    for arch in ("LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM", "Llama4ForCausalLM"):
        assert arch in remap.SUPPORTED_ARCHITECTURES


def test_renamed_weight():
    kept = [0, 3, 7]
    assert remap.renamed_weight("model.layers.3.mlp.up_proj.weight", kept) == "model.layers.1.mlp.up_proj.weight"
    assert remap.renamed_weight("model.layers.7.input_layernorm.weight", kept) == "model.layers.2.input_layernorm.weight"
    assert remap.renamed_weight("model.layers.4.self_attn.q_proj.weight", kept) is None
    assert remap.renamed_weight("model.embed_tokens.weight", kept) == "model.embed_tokens.weight"
    assert remap.renamed_weight("lm_head.weight", kept) == "lm_head.weight"


def _write_sharded(tmp_path, num_layers: int = 4):
    import torch

    shard_of = {}
    for layer in range(num_layers):
        name = f"model-{layer:05d}.safetensors"
        save_file({f"model.layers.{layer}.mlp.weight": torch.full((2, 2), float(layer))}, tmp_path / name)
        shard_of[f"model.layers.{layer}.mlp.weight"] = name
    save_file({"model.embed_tokens.weight": torch.zeros(3, 2)}, tmp_path / "model-extra.safetensors")
    shard_of["model.embed_tokens.weight"] = "model-extra.safetensors"
    (tmp_path / checkpoint.INDEX_NAME).write_text(json.dumps({"weight_map": shard_of}))


def test_only_kept_tensors_are_read_and_pruned_shards_never_opened(tmp_path):
    _write_sharded(tmp_path)
    kept = [0, 1, 3]
    to_open, read_bytes, skipped = weights.plan_reads(checkpoint.safetensors_files(tmp_path), kept)
    assert tmp_path / "model-00002.safetensors" not in to_open
    assert skipped == 16 and read_bytes == 3 * 16 + 24  # 2x2 and 3x2 float32 tensors
    (tmp_path / "model-00002.safetensors").write_bytes(b"corrupt: must never be opened")
    loaded = dict(weights.iter_kept_weights(to_open, kept))
    assert sorted(loaded) == ["model.embed_tokens.weight", "model.layers.0.mlp.weight",
                              "model.layers.1.mlp.weight", "model.layers.2.mlp.weight"]
    assert float(loaded["model.layers.2.mlp.weight"][0, 0]) == 3.0  # original block 3


def test_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(OptionError, match="safetensors"):
        checkpoint.safetensors_files(tmp_path)


# Edges a mutation pass found untested; each fails with the check it names removed.


def test_a_derived_field_written_as_null_is_derived_like_a_missing_one():
    config = _family("Gemma2ForCausalLM", "gemma2", 4, sliding_window=64, layer_types=None)
    assert remap.remap_config(config, [0, 2, 3])["layer_types"] == [
        "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("length", [7, 9])
def test_layer_types_of_another_length_than_the_stack_are_refused(length):
    with pytest.raises(OptionError, match=f"layer_types has {length} entries"):
        remap.remap_config(_llama(8, layer_types=["full_attention"] * length), [0, 1])


def test_a_derived_field_of_the_wrong_length_is_refused_naming_it():
    """Llama 4 derives no_rope_layers; one of the wrong length would be kept unsliced."""
    config = _family("Llama4ForCausalLM", "llama4_text", interleave_moe_layer_step=2, no_rope_layers=[1] * 5,
                     layer_types=["full_attention"] * 8)
    with pytest.raises(OptionError, match="no_rope_layers has 5 entries"):
        remap.remap_config(config, [0, 1, 4, 5])


def test_an_index_lists_each_shard_once_in_order(tmp_path):
    _write_sharded(tmp_path)
    index = json.loads((tmp_path / checkpoint.INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00000.safetensors"  # a second tensor in the first shard
    (tmp_path / checkpoint.INDEX_NAME).write_text(json.dumps(index))
    assert checkpoint.safetensors_files(tmp_path) == sorted(tmp_path / name for name in set(index["weight_map"].values()))


def test_mistrals_consolidated_copy_is_not_a_shard(tmp_path):
    import torch

    save_file({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    save_file({"layers.0.feed_forward.w1.weight": torch.zeros(2, 2)}, tmp_path / "consolidated.safetensors")
    assert checkpoint.safetensors_files(tmp_path) == [tmp_path / "model.safetensors"]
