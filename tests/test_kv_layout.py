"""The KV-cache layouts of the pruned model and of the full one (``vllm/kv_layout.py``).

No engine: a real ``VllmConfig`` of the tiny Llama, fake attention layers that declare
vLLM's own ``KVCacheSpec`` objects, and vLLM's grouping. The engine tests in
``test_kv_capacity.py`` check the ratio against a served model.
"""

from __future__ import annotations

import pytest
import torch

from vllm_miprun.vllm import kv_layout

F, S = "full_attention", "sliding_attention"
GEMMA2_TYPES = [S if i % 2 == 0 else F for i in range(8)]  # transformers' Gemma 2 default
KEPT_MIX = [0, 1, 3, 5, 7]  # 2, 4 and 6 pruned: one sliding block kept, four full


def _name(j: int) -> str:
    return f"model.layers.{j}.self_attn.attn"


def test_each_pruned_block_gets_the_spec_of_a_kept_block_of_its_layer_type():
    pruned = {_name(j): ("S" if GEMMA2_TYPES[b] == S else "F") + str(b) for j, b in enumerate(KEPT_MIX)}
    full = kv_layout.full_specs(pruned, KEPT_MIX, 8, GEMMA2_TYPES)
    assert [full[_name(b)] for b in KEPT_MIX] == ["S0", "F1", "F3", "F5", "F7"]  # kept blocks: their own
    assert [full[_name(b)] for b in (2, 4, 6)] == ["S0", "S0", "S0"]  # pruned sliding: the kept sliding one's


def test_one_layer_type_fills_every_block_and_the_unknown_cases_are_none():
    same = {_name(j): "A" for j in range(4)}
    assert kv_layout.full_specs(same, [0, 1, 2, 7], 8, None) == {_name(b): "A" for b in range(8)}
    assert kv_layout.full_specs({**same, _name(3): "B"}, [0, 1, 2, 7], 8, None) is None  # two specs, no types
    assert kv_layout.full_specs({_name(0): "A"}, [1], 2, [S, F]) is None  # no kept sliding block
    assert kv_layout.full_specs({_name(4): "A"}, [0, 1, 2, 7], 8, None) is None  # index past the kept list


class _Layer:
    def __init__(self, spec):
        self.spec = spec

    def get_kv_cache_spec(self, vllm_config):
        return self.spec


def _config(tiny_llama_dir, max_model_len: int):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(tiny_llama_dir), enforce_eager=True, max_model_len=max_model_len,
                      dtype="float32").create_engine_config()


def _specs():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    slide = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=32)
    return full, slide


@pytest.fixture
def vllm_config(tiny_llama_dir):
    return _config(tiny_llama_dir, 256)


def test_one_layer_type_halves_the_bytes_per_block_and_leaves_the_layout_to_the_engine(vllm_config, monkeypatch):
    full, _ = _specs()
    monkeypatch.setattr(kv_layout, "attention_layers", lambda cfg: {_name(j): _Layer(full) for j in range(4)})
    got = kv_layout.kv_layouts(vllm_config, lambda: {"model_type": "llama", "num_hidden_layers": 8}, [0, 1, 2, 7], 8)
    assert got is not None
    assert got["full"]["bytes_per_block"] == 2 * got["pruned"]["bytes_per_block"]  # 8 layers' pages vs 4
    assert got["pruned"]["blocks_per_request"] == got["full"]["blocks_per_request"] == 256 // 16
    assert vllm_config.cache_config.kv_cache_layout is None  # the engine core resolves it after the load


def test_a_gemma2_config_without_layer_types_gets_the_alternating_default(vllm_config, monkeypatch):
    """Older Gemma 2 config.json files have no layer_types: transformers' default decides."""
    full, slide = _specs()
    layers = {_name(j): _Layer(slide if GEMMA2_TYPES[b] == S else full) for j, b in enumerate(KEPT_MIX)}
    monkeypatch.setattr(kv_layout, "attention_layers", lambda cfg: layers)
    got = kv_layout.kv_layouts(vllm_config, lambda: {"model_type": "gemma2", "num_hidden_layers": 8}, KEPT_MIX, 8)
    by_hand = {_name(b): slide if GEMMA2_TYPES[b] == S else full for b in range(8)}
    with kv_layout.layout_resolved(vllm_config, layers, by_hand):
        want_full = kv_layout.layout(vllm_config, by_hand)
        want_pruned = kv_layout.layout(vllm_config, {name: layer.spec for name, layer in layers.items()})
    assert got == {"pruned": want_pruned, "full": want_full}
    assert want_pruned != want_full


def test_blocks_per_request_is_exact_where_float_division_is_not(tiny_llama_dir):
    """93 blocks of 16 tokens: 1024 / (1024 / 93) is 92.99999999999999 in floating point."""
    config = _config(tiny_llama_dir, 93 * 16)
    config.cache_config.kv_cache_layout = "NHD"
    full, _ = _specs()
    assert kv_layout.layout(config, {_name(j): full for j in range(4)})["blocks_per_request"] == 93
