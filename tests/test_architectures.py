"""Every supported family on tiny seeded configs: (a) the block-by-block runner reproduces
transformers' hidden states; (b) the exported pruned checkpoint equals transformers with
the same blocks deleted, and every kept block keeps its kind (window, MoE or dense, RoPE).

Tolerances (float32 on CPU): boundary states and logits within rtol=1e-4, atol=1e-4.
The vLLM side is in ``test_architectures_engine.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from references import load_hf
from tiny_models import FAMILY_ARCHS
from vllm_miprun.model import remap
from vllm_miprun.model.architectures.hf_model import decoder_layers, delete_blocks
from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.options import OptionError
from vllm_miprun.pipeline.plan import Plan
from vllm_miprun.tools.export import export_pruned

FAMILIES = list(FAMILY_ARCHS)
NUM_BLOCKS = 4
SEQ_LEN = 24  # longer than the 8-token windows of the windowed families
TOL = dict(rtol=1e-4, atol=1e-4)
# Drop block 2 of 4 (what "last" picks at keep 0.75). Llama 4 keeps [2, 3]: dropping
# block 2 would leave MoE blocks no interleave step can place (refused, tested below).
# Per-expert checkpoint tensors that transformers' loader fuses: those blocks always go through it.
FUSED_EXPERTS = {"mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4"}
KEPT = {arch: [0, 1, 3] for arch in FAMILIES} | {"llama4": [2, 3]}


SHAPE = dict(num_layers=NUM_BLOCKS, hidden_size=64, num_heads=2, num_kv_heads=1)  # also the engine test's


@pytest.fixture(scope="session")
def family_dir(family_model):
    return lambda arch: family_model(arch, **SHAPE)


def _ids(batch: int = 2):
    return torch.randint(3, 500, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _plan(kept: list[int]) -> Plan:
    return Plan(num_blocks=NUM_BLOCKS, kept=tuple(kept), pruned=tuple(sorted(set(range(NUM_BLOCKS)) - set(kept))),
                method="explicit", keep_ratio=len(kept) / NUM_BLOCKS, predicted_speedup=1.0,
                latency_source="none", objective=None, scores_source="none-needed", cache_path=None,
                fingerprint=None)


@pytest.mark.parametrize("arch", FAMILIES)
def test_runner_reproduces_transformers_hidden_states(arch, family_dir):
    model_dir = family_dir(arch)
    ids = _ids()
    with torch.inference_mode():
        reference = load_hf(model_dir)(ids, output_hidden_states=True, use_cache=False)
    runner = BlockwiseModel(model_dir)
    expected = torch.log_softmax(reference.logits[:, :-1].float(), dim=-1)
    passes = []
    for _ in range(2):  # the second pass re-loads every block, by direct assignment where verified
        hidden = runner.embed_tokens(ids)
        torch.testing.assert_close(hidden, reference.hidden_states[0], **TOL)
        for index in range(NUM_BLOCKS):
            with runner.block(index) as layer:
                hidden = runner.run_block(layer, hidden)  # 2 sequences, one micro-batch: masks broadcast
            if index < NUM_BLOCKS - 1:  # transformers' last entry is after the final norm
                torch.testing.assert_close(hidden, reference.hidden_states[index + 1], **TOL)
            assert all(p.is_meta for p in runner.layers.parameters()), "a block stayed resident"
        torch.testing.assert_close(runner.token_logprobs(hidden), expected, **TOL)
        passes.append(hidden)
    assert torch.equal(passes[0], passes[1])
    assert runner.blocks_loaded == 2 * NUM_BLOCKS
    if arch not in FUSED_EXPERTS:  # every re-load after the first block skips transformers' loader
        assert runner.blocks_assigned == 2 * NUM_BLOCKS - 1


def _block_kinds(model, indices) -> list[tuple]:
    """What makes blocks differ inside one model: module types and per-layer attention settings."""
    layers = decoder_layers(model)
    kinds = []
    for i in indices:
        layer = layers[i]
        attn = next(m for name, m in layer.named_modules() if name.endswith(("self_attn", "attention")))
        kinds.append((tuple(type(m).__name__ for m in layer.modules()),
                      getattr(attn, "sliding_window", None), getattr(attn, "use_rope", None),
                      getattr(attn, "is_sliding", None)))
    return kinds


@pytest.mark.parametrize("arch", FAMILIES)
def test_exported_checkpoint_equals_transformers_with_blocks_deleted(arch, family_dir, tmp_path):
    model_dir, kept = family_dir(arch), KEPT[arch]
    out = export_pruned(model_dir, tmp_path / "pruned", _plan(kept))
    full = load_hf(model_dir)
    expected_kinds = _block_kinds(full, kept)
    pruned = load_hf(out)
    assert pruned.config.num_hidden_layers == len(kept)
    assert _block_kinds(pruned, range(len(kept))) == expected_kinds  # each kept block keeps its kind
    types = getattr(full.config, "layer_types", None)
    if types is not None:
        assert list(pruned.config.layer_types) == [types[k] for k in kept]
    ids = _ids(1)
    with torch.inference_mode():
        exported_logits = pruned(ids, use_cache=False).logits
        deleted_logits = delete_blocks(full, kept)(ids, use_cache=False).logits
    torch.testing.assert_close(exported_logits, deleted_logits, **TOL)
    # The runner, skipping the pruned blocks of the full model, agrees with both.
    runner = BlockwiseModel(model_dir)
    pruned_set = frozenset(range(NUM_BLOCKS)) - set(kept)
    final = runner.forward_from(runner.embed_tokens(ids), 0, pruned=pruned_set)
    torch.testing.assert_close(runner.token_logprobs(final),
                               torch.log_softmax(exported_logits[:, :-1], dim=-1), **TOL)


def test_derived_layer_types_are_materialised_and_sliced(family_dir):
    config = json.loads((family_dir("gemma3") / "config.json").read_text())
    assert "layer_types" not in config and config["sliding_window_pattern"] == 2
    new = remap.remap_config(config, [0, 1, 3])
    assert new["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]


def test_llama4_refuses_moe_blocks_no_step_can_place(family_dir):
    config = json.loads((family_dir("llama4") / "config.json").read_text())
    with pytest.raises(OptionError, match="interleave_moe_layer_step"):
        remap.remap_config(config, [0, 1, 3])


def test_unsupported_architecture_is_refused_before_the_runner_reads_anything(family_dir, tmp_path):
    import shutil

    model_dir = shutil.copytree(family_dir("llama"), tmp_path / "gpt2")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    (model_dir / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(OptionError, match="LlamaForCausalLM, .*Gemma3ForCausalLM"):
        BlockwiseModel(model_dir)


def test_gemma3_calibrates_and_plans_end_to_end(family_dir, tmp_path):
    """The issue's crash (``Tensor on device meta``): calibration, then an MI-PRUN plan whose
    forward search runs the block runner with prefix reuse."""
    from vllm_miprun.options import CalibrationSettings, MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibrate
    from vllm_miprun.pipeline.plan import make_plan

    model_dir = family_dir("gemma3")
    settings = CalibrationSettings(samples=4, seq_len=32)
    result = calibrate(model_dir, settings, cache_dir=tmp_path, progress=False)
    assert result.cache.num_blocks == NUM_BLOCKS
    assert all(score == score and score >= 0 for score in result.cache.block_scores)  # finite MI, nats
    options = MiprunOptions.from_dict({"keep": 0.75, "method": "mi-prun", "cache_dir": str(tmp_path),
                                       "samples": 4, "seq_len": 32})
    plan = make_plan(model_dir, options, hf_config=json.loads((model_dir / "config.json").read_text()))
    assert len(plan.kept) == 3 and plan.scores_source == "cache-hit"
