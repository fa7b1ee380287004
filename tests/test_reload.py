"""Weights reach the pruned model the same way at the first load, a reload and a push.

Fast tests: full-model names are renumbered and pruned blocks dropped; the LoRA mapper does
not renumber base weights (vLLM's ``AutoWeightsLoader`` with the model's mapper, as Gemma 2/3
and Cohere2 call it); the diagonal heal fold is exact and does no matrix product.
Engine tests (marked ``engine``): ``collective_rpc("reload_weights")`` and a push of the
full checkpoint restore a zeroed pruned model to the same tokens and log-probs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vllm_miprun.core import heal_math
from vllm_miprun.model.architectures.base import HealSite
from vllm_miprun.pipeline import heal
from vllm_miprun.vllm import full_model_weights, lora_and_draft

LLAMA = HealSite()  # these models' maps (if any) fold into mlp.down_proj


class _Recorder:  # a model whose own load_weights records what it was given
    def __init__(self):
        self.seen: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.seen += list(weights)
        return {name for name, _ in self.seen}


def _block_tensor(block: int) -> torch.Tensor:
    return torch.full((4, 3), float(block))


def test_full_model_names_land_on_kept_blocks_and_pruned_blocks_are_dropped(caplog):
    model = _Recorder()
    full_model_weights.take_full_model_names(model, [0, 2, 5], 6, {}, LLAMA)
    full_model_weights.take_full_model_names(model, [0, 2, 5], 6, {}, LLAMA)  # a second load: no double wrap
    pushed = [("model.embed_tokens.weight", torch.zeros(2))]
    pushed += [(f"model.layers.{b}.mlp.down_proj.weight", _block_tensor(b)) for b in range(6)]
    logging.getLogger(full_model_weights.logger.name).propagate = True
    with caplog.at_level(logging.INFO, logger=full_model_weights.logger.name):
        model.load_weights(iter(pushed))
    got = {name: float(t.flatten()[0]) for name, t in model.seen}
    assert got == {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.down_proj.weight": 0.0,
                   "model.layers.1.mlp.down_proj.weight": 2.0, "model.layers.2.mlp.down_proj.weight": 5.0}
    assert any("[1, 3, 4]" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_a_push_folds_the_heal_map_into_its_block():
    model = _Recorder()
    scales = torch.tensor([2.0, 3.0, 0.5, 1.0])
    full_model_weights.take_full_model_names(model, [0, 2, 5], 6, {3: torch.diag(scales)}, LLAMA)  # run [3, 5)
    model.load_weights([("model.layers.2.mlp.down_proj.weight", _block_tensor(2)),
                        ("model.layers.5.mlp.down_proj.weight", _block_tensor(5))])
    got = dict(model.seen)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], 2.0 * scales[:, None].expand(4, 3))
    torch.testing.assert_close(got["model.layers.2.mlp.down_proj.weight"], _block_tensor(5))


def test_a_push_of_some_tensors_needs_not_carry_the_fold_target():
    """A trainer may push only some tensors: the heal fold applies to what comes, and a map
    whose down_proj is not in this push is no error (the first load checks the whole checkpoint)."""
    model = _Recorder()
    full_model_weights.take_full_model_names(model, [0, 2, 5], 6, {3: torch.eye(4)}, LLAMA)  # folds into block 2
    model.load_weights([("model.layers.5.mlp.down_proj.weight", _block_tensor(5))])
    assert [name for name, _ in model.seen] == ["model.layers.2.mlp.down_proj.weight"]


class _GemmaLike(nn.Module):
    """Loads like Gemma 2/3 and Cohere2: ``AutoWeightsLoader`` with the instance's mapper."""

    def __init__(self, num_blocks: int):
        super().__init__()
        from vllm.model_executor.models.utils import WeightsMapper

        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(3, 4, bias=False)})
                                          for _ in range(num_blocks))
        self.hf_to_vllm_mapper = WeightsMapper(orig_to_new_substr={".dense.": ".proj."})

    def load_weights(self, weights):
        from vllm.model_executor.models.utils import AutoWeightsLoader

        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


def test_with_lora_a_later_load_does_not_renumber_kept_blocks_twice():
    kept, num_blocks = [0, 2, 4, 6], 8
    model = _GemmaLike(len(kept))
    full_model_weights.take_full_model_names(model, kept, num_blocks, {}, LLAMA)
    lora_and_draft.route_lora_to_kept_blocks(model, kept, num_blocks)  # LoRA on: after the first load
    loaded = model.load_weights((f"model.layers.{b}.dense.weight", _block_tensor(b)) for b in range(num_blocks))
    assert loaded == {f"model.layers.{j}.proj.weight" for j in range(len(kept))}
    for j, block in enumerate(kept):
        torch.testing.assert_close(model.model.layers[j]["proj"].weight.data, _block_tensor(block))
    lora_renames = model.hf_to_vllm_mapper.get_rename_mapper()  # what LoRA still gets
    assert lora_renames.map_name("model.layers.4.dense.lora_A") == "model.layers.2.proj.lora_A"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diagonal_fold_scales_rows_exactly_like_the_dense_product(dtype):
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    d, d_ff, vocab = 64, 176, 50
    transform = torch.diag(1.0 + 0.3 * torch.randn(d, generator=gen))
    weight = torch.randn(d, d_ff, generator=gen).to(dtype)
    bias = torch.randn(d, generator=gen).to(dtype)
    embedding = torch.randn(vocab, d, generator=gen).to(dtype)
    dense = {"down": (transform.double() @ weight.double()).to(dtype),
             "bias": (transform.double() @ bias.double()).to(dtype),
             "embed": (embedding.double() @ transform.double().T).to(dtype)}
    for form in (transform, heal_math.compact(transform)):  # the [d, d] map and its [d] scales
        with FlopCounterMode(display=False) as flops:
            folded = {"down": heal_math.fold_down_proj(weight, form), "bias": heal_math.fold_bias(bias, form),
                      "embed": heal_math.fold_embedding(embedding, form)}
        assert flops.get_total_flops() == 0  # no matrix product
        for key, want in dense.items():
            assert folded[key].dtype == dtype and torch.equal(folded[key], want), key
    full = transform + 0.01 * torch.ones(d, d)  # not diagonal: the dense fold as before
    assert heal_math.compact(full) is full
    torch.testing.assert_close(heal_math.fold_down_proj(weight.float(), full), (full @ weight.float()))


def test_fold_stream_takes_a_diagonal_map_as_its_scales():
    maps = {1: torch.tensor([2.0, 4.0])}  # what a weight push keeps in memory: [d], not [d, d]
    stream = [("model.layers.0.mlp.down_proj.weight", torch.ones(2, 3))]
    (name, folded), = heal.fold_stream(stream, maps, [0, 2], LLAMA)
    torch.testing.assert_close(folded, torch.tensor([[2.0] * 3, [4.0] * 3]))


# --- engines --------------------------------------------------------------------------

def _run_reload(spec: dict) -> dict:
    from engine_kit import run_engines

    (result,) = run_engines([{**spec, "scenario": "reload"}], VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return result


def _assert_restored(result: dict) -> None:
    before = result["before"]
    assert result["corrupted"]["logprobs"] != before["logprobs"]  # the zeroed model is another model
    for step in ("reloaded", "pushed"):
        assert result[step]["tokens"] == before["tokens"], step
        assert result[step]["logprobs"] == before["logprobs"], step


@pytest.mark.engine
def test_reload_and_full_checkpoint_push_restore_a_healed_pruned_engine(tiny_llama_dir, tmp_path):
    extra = {"keep": 0.5, "method": "last", "heal": "linear", "samples": 4, "seq_len": 32,
             "cache_dir": str(tmp_path / "cache")}
    result = _run_reload({"model": str(tiny_llama_dir), "extra": extra})
    assert result["kept"] == [0, 1, 2, 7] and result["pushed_tensors"] > 0
    _assert_restored(result)  # the heal map is folded on every path, so log-probs are equal


@pytest.mark.engine
def test_reload_with_lora_on_gemma2_renumbers_once(tmp_path):
    from tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "gemma2", arch="gemma2")
    extra = {"drop": "1,3,5,7", "cache_dir": str(tmp_path / "cache")}  # every kept block moves
    result = _run_reload({"model": str(model_dir), "extra": extra, "lora": True})
    assert result["kept"] == [0, 2, 4, 6]
    _assert_restored(result)


def test_expert_parallel_filter_skips_other_ranks_experts_of_kept_blocks(tmp_path):
    """What the loader hands vLLM's EP weight filter (``should_skip_weight``): names are the
    checkpoint's, and skipped tensors are never read."""
    from safetensors.torch import save_file
    from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

    from vllm_miprun.model import weights

    tensors = {"model.embed_tokens.weight": torch.zeros(2, 2)}
    for block in range(3):
        tensors[f"model.layers.{block}.mlp.gate.weight"] = torch.zeros(4, 2)
        tensors.update({f"model.layers.{block}.mlp.experts.{e}.down_proj.weight": torch.zeros(2, 2) for e in range(4)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    names = [name for name, _ in weights.iter_kept_weights([tmp_path / "model.safetensors"], [0, 2], renumber=False,
                                                           skip=lambda name: should_skip_weight(name, {1, 3}))]
    assert sorted(names) == sorted(["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight",
                                    "model.layers.2.mlp.gate.weight"] + [
        f"model.layers.{b}.mlp.experts.{e}.down_proj.weight" for b in (0, 2) for e in (1, 3)])


def test_loader_gives_vllm_reload_the_kept_tensors_under_full_model_names(tiny_llama_dir):
    """``reload_weights`` asks the loader for ``get_all_weights`` (else NotImplementedError)."""
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm.loader import MiprunModelLoader

    hf_config = SimpleNamespace(miprun_kept_layers=[0, 1, 2, 7], miprun_num_blocks_full=8)
    model_config = SimpleNamespace(model=str(tiny_llama_dir), revision=None, hf_config=hf_config, is_moe=False)
    loader = MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config={"keep": 0.5}))
    with set_current_vllm_config(VllmConfig()):
        names = [name for name, _ in loader.get_all_weights(model_config, None)]
    blocks = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
    assert blocks == {0, 1, 2, 7} and "model.embed_tokens.weight" in names


def test_loader_hands_the_ep_filter_to_the_weight_reader(tmp_path, monkeypatch):
    """With vLLM's expert-parallel weight filter on (it sets ``local_expert_ids``), the loader's
    own stream skips other ranks' experts before reading them."""
    from safetensors.torch import save_file
    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm import loader as loader_module

    tensors = {"model.embed_tokens.weight": torch.zeros(2, 2)}
    for block in range(3):
        tensors.update({f"model.layers.{block}.mlp.experts.{e}.down_proj.weight": torch.zeros(2, 2) for e in range(4)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(loader_module, "init_ep_weight_filter",
                        lambda loader, model, model_config: setattr(loader, "local_expert_ids", {1, 3}))
    loader = loader_module.MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config={"keep": 0.5}))
    names = [name for name, _ in loader._kept_weights(None, None, [tmp_path / "model.safetensors"], [0, 2])]
    assert sorted(names) == sorted(["model.embed_tokens.weight"] + [
        f"model.layers.{b}.mlp.experts.{e}.down_proj.weight" for b in (0, 2) for e in (1, 3)])
