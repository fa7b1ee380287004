"""heal=linear on quantized checkpoints: refused before any fit where a map cannot fold
exactly (integer formats, FP8 per-tensor or block scales); folded into the scales where it
can (FP8 with one scale per output channel)."""

from __future__ import annotations

import json

import pytest
import torch

from test_quantization import QCONFIGS, write_quantized_checkpoint
from vllm_miprun.model import checkpoint, quantization, weights
from vllm_miprun.options import MiprunOptions
from vllm_miprun.pipeline import heal
from vllm_miprun.pipeline.plan import make_plan

KEPT = [1, 2, 5, 6]  # runs start at 0 (the float embedding), 3 and 7
NUM_BLOCKS = 8
CALIBRATION = {"samples": 4, "seq_len": 32}


def _options(tmp_path) -> MiprunOptions:
    return MiprunOptions.from_dict({"keep": 0.5, "heal": "linear", "device": "cpu",
                                    "cache_dir": str(tmp_path / "cache"), **CALIBRATION})


def _ct_fp8(strategy: str) -> dict:
    qcfg = json.loads(json.dumps(QCONFIGS["compressed-tensors"]))
    qcfg["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    return qcfg


REFUSED = {
    "gptq": ("gptq", None, "gptq-quantized"),
    "awq": ("awq", None, "awq-quantized"),
    "fp8-block": ("fp8", None, "fp8 checkpoint's weight scales are block"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_heal_on_a_format_it_cannot_fold_into_is_refused_before_any_work(case, tiny_llama_dir, tmp_path):
    method, qcfg, message = REFUSED[case]
    folder = tmp_path / case
    write_quantized_checkpoint(tiny_llama_dir, folder, method, qcfg)
    options = _options(tmp_path)
    with pytest.raises(heal.HealError, match=message):
        heal.prepare_maps(folder, options, KEPT, NUM_BLOCKS, progress=False)
    with pytest.raises(heal.HealError, match=message):  # the plan refuses it before calibrating
        make_plan(folder, options, progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), \
        "nothing was calibrated or fitted"


def test_fp8_per_tensor_scales_are_refused_at_the_tensor_level_too(tiny_llama_dir, tmp_path):
    """A config that claims per-channel scales while the tensors hold one per tensor."""
    folder = tmp_path / "ct-tensor"
    write_quantized_checkpoint(tiny_llama_dir, folder, "compressed-tensors", _ct_fp8("channel"))
    from safetensors.torch import load_file, save_file

    from test_quantization import fp8_quantize

    tensors = load_file(str(folder / "model.safetensors"))
    module = "model.layers.2.mlp.down_proj"
    dense = tensors[f"{module}.weight"].float() * tensors[f"{module}.weight_scale"]
    tensors.update({f"{module}.{leaf}": t for leaf, t in fp8_quantize(dense, "tensor").items() if leaf != "ref"})
    save_file(tensors, str(folder / "model.safetensors"))
    header = checkpoint.read_header(folder / "model.safetensors")
    heal.check_quantized_targets(header, [6])  # a per-channel block passes
    with pytest.raises(heal.HealError, match=r"scale of shape \[1\] is not one scale per output channel"):
        heal.check_quantized_targets(header, [2])
    # block 2 is where the map of the run starting at 3 folds (KEPT keeps 2, prunes 3 and 4)
    assert 2 in KEPT and 3 not in KEPT and 4 not in KEPT
    with pytest.raises(heal.HealError, match=r"model.layers.2.mlp.down_proj: its FP8 scale of shape \[1\]"):
        heal.maps_request(folder, _options(tmp_path), KEPT, NUM_BLOCKS)


def test_a_diagonal_map_folds_exactly_into_fp8_channel_scales(tiny_llama_dir, tmp_path):
    folder = tmp_path / "ct-channel"
    qcfg = _ct_fp8("channel")
    write_quantized_checkpoint(tiny_llama_dir, folder, "compressed-tensors", qcfg)
    heal.check_heal_quantization(checkpoint.read_config(folder))  # accepted
    # heal=distill trains one scale per channel here (a full map folds into no FP8 scale),
    # and a full map on the same float model
    assert heal.recipe_for("distill", checkpoint.read_config(folder))["form"] == "diag"
    assert heal.recipe_for("distill", checkpoint.read_config(tiny_llama_dir))["form"] == "full"
    gen = torch.Generator().manual_seed(0)
    # Scales up to 3x and negative entries: a fold into the FP8 values would clip at 448 and re-round.
    maps = {start: torch.diag(3 * torch.rand(128, generator=gen) * torch.sign(torch.randn(128, generator=gen)))
            for start in (3, 7)}
    files = checkpoint.safetensors_files(folder)
    plain = dict(weights.iter_kept_weights(files, KEPT))
    site = heal.heal_site(checkpoint.read_config(folder))
    folded = dict(heal.fold_stream(weights.iter_kept_weights(files, KEPT), maps, KEPT, site))
    for start, transform in maps.items():
        module = f"model.layers.{KEPT.index(start - 1)}.mlp.down_proj"
        parts = [f"{module}.weight", f"{module}.weight_scale"]
        assert folded[parts[0]].dtype == torch.float8_e4m3fn
        before = quantization.dequantize({p: plain[p] for p in parts}, qcfg)[parts[0]].double()
        after = quantization.dequantize({p: folded[p] for p in parts}, qcfg)[parts[0]].double()
        torch.testing.assert_close(after, transform.double() @ before, rtol=1e-6, atol=0)
    untouched = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(folded[untouched].view(torch.uint8), plain[untouched].view(torch.uint8))
