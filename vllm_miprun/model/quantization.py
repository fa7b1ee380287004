"""Quantized checkpoints: find the format, refuse the ones miprun cannot read, dequantize a block.

Pure torch, no vLLM import. Calibration runs an unquantized transformers skeleton, so
each block's quantized tensors are turned back into plain ``<module>.weight`` float
tensors before ``load_state_dict``. The packing conventions follow the installed vLLM
(``layers/quantization/auto_gptq.py``, ``auto_awq.py``, ``fp8.py``,
``compressed_tensors/``, ``utils/quant_utils.py``):

- GPTQ: ``qweight`` [in / (32/bits), out] int32 packed along the input dim, value ``j``
  of a word at bits ``j*bits``; ``qzeros`` [groups, out / (32/bits)] packed along the
  output dim the same way; ``scales`` [groups, out]; ``g_idx`` [in] (row -> group, the
  desc_act order). Symmetric checkpoints use the zero ``2**(bits-1)`` (vLLM's uint4b8 /
  uint8b128); asymmetric "gptq" (v1) checkpoints store ``zero - 1``, "gptq_v2" the zero.
- AWQ (GEMM): ``qweight`` [in, out/8] int32 packed along the output dim in AWQ's order
  (column ``c`` of a group of 8 at nibble ``[0, 4, 1, 5, 2, 6, 3, 7][c]``); ``qzeros``
  [groups, out/8] packed the same way; ``scales`` [groups, out]; W = (q - z) * s.
- FP8: ``weight`` float8 [out, in] times ``weight_scale`` (per tensor [] / [1], per
  channel [out, 1]) or block-wise ``weight_scale_inv`` (vLLM ``fp8``) / ``weight_scale``
  (compressed-tensors ``block``), [ceil(out/bn), ceil(in/bk)] for blocks bn x bk.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vllm_miprun.errors import ModelFolderError, OptionError
from vllm_miprun.model import checkpoint

SUPPORTED_TEXT = ("compressed-tensors FP8 (float-quantized), fp8 (per-tensor or block-wise), "
                  "gptq (4 or 8 bit), awq (4-bit GEMM)")
# Leaf names a quantized linear module holds instead of (or next to) a float ``weight``.
_INT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_FP8_LEAVES = ("weight", "weight_scale", "weight_scale_inv", "input_scale",
               "weight_zero_point", "input_zero_point")
# FP8 KV-cache and attention scales: serving-only, an unquantized skeleton has no slot for them.
_FP8_SERVING_ONLY = ("k_scale", "v_scale", "q_scale", "prob_scale", "output_scale")
# Names that only a quantized checkpoint holds: a checkpoint with them but no config is refused.
QUANTIZED_LEAVES = ("qweight", "qzeros", "weight_scale", "weight_scale_inv", "weight_packed")
_CT_FORMATS = ("float-quantized", "naive-quantized")
_AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding column c of each group of 8


class UnsupportedQuantizationError(OptionError):
    """The checkpoint's quantization format cannot be read by miprun (yet)."""


def quantization_config(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization config, where vLLM looks for it, or None."""
    text_config = hf_config.get("text_config")
    for holder in (hf_config, text_config if isinstance(text_config, dict) else {}):
        if holder.get("quantization_config"):
            return _config_object(holder["quantization_config"], "quantization_config")
    return _config_object(hf_config.get("compression_config") or None, "compression_config")


def _config_object(value: Any, key: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        _refuse(f"{key}={str(value)[:80]} (config.json gives it as a {type(value).__name__}, not an object)")
    return value


def quant_method(hf_config: dict[str, Any]) -> str | None:
    """``"compressed-tensors"``, ``"fp8"``, ``"gptq"``, ``"awq"`` or None (unquantized).

    Anything else, or a variant of these that cannot be dequantized, is refused here,
    before any work, with one line that names it and the supported list.
    """
    qcfg = quantization_config(hf_config)
    if qcfg is None:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    checks = {"compressed-tensors": _check_compressed_tensors, "fp8": _check_fp8,
              "gptq": _check_gptq, "awq": _check_awq}
    if method not in checks:
        _refuse(f"quant_method={method or qcfg.get('quant_method')!r}")
    checks[method](qcfg)
    return method


def check_quantized_names(method: str | None, tensor_names) -> None:
    """Refuse quantized tensors in a checkpoint whose config declares no quantization
    (a side file such as ``quantize_config.json`` that vLLM reads but config.json lacks)."""
    if method is not None:
        return
    found = next((n for n in tensor_names if n.rsplit(".", 1)[-1] in QUANTIZED_LEAVES), None)
    if found is not None:
        raise UnsupportedQuantizationError(
            f"tensor {found} is quantized but config.json has no quantization_config; "
            "add the quantization_config to config.json (miprun reads "
            f"{SUPPORTED_TEXT}) or prune an unquantized copy"
        )


def check_checkpoint_quantization(model_dir: str | Path, hf_config: dict[str, Any] | None = None) -> str | None:
    """The plan-time check (headers and config only): the quant method, or a one-line refusal.

    A folder without safetensors passes here; the reader that needs the weights says so.
    """
    method = quant_method(hf_config if hf_config is not None else checkpoint.read_config(model_dir))
    if method is None:
        try:
            names = checkpoint.tensor_names(model_dir)
        except ModelFolderError:
            return None
        check_quantized_names(None, names)
    return method


def _refuse(what: str) -> None:
    raise UnsupportedQuantizationError(
        f"miprun cannot read checkpoints quantized with {what}; it reads {SUPPORTED_TEXT}. "
        "Serve this checkpoint without --load-format miprun, or prune an unquantized copy"
    )


def _check_fp8(qcfg: dict[str, Any]) -> None:
    block = qcfg.get("weight_block_size")
    if block is not None and (not isinstance(block, list) or len(block) != 2
                              or not all(type(b) is int and b > 0 for b in block)):  # True is an int too
        _refuse(f"fp8 weight_block_size={block!r} (expected two positive integers)")


def _check_compressed_tensors(qcfg: dict[str, Any]) -> None:
    groups = qcfg.get("config_groups") or {}
    if not groups:
        _refuse("compressed-tensors without config_groups")
    sparsity = qcfg.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        _refuse(f"compressed-tensors sparsity format {sparsity.get('format')!r}")
    if qcfg.get("transform_config"):
        _refuse("compressed-tensors transform_config (rotations)")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        fmt = group.get("format") or qcfg.get("format")
        kind = f"{weights.get('type')} {weights.get('num_bits')}-bit"
        if weights.get("type") != "float" or weights.get("num_bits") != 8 or fmt not in _CT_FORMATS:
            _refuse(f"compressed-tensors {kind} format {fmt!r} (config group {name})")
        if weights.get("symmetric") is False:
            _refuse(f"compressed-tensors asymmetric FP8 (config group {name})")
        if weights.get("strategy") not in ("tensor", "channel", "block"):
            _refuse(f"compressed-tensors FP8 strategy {weights.get('strategy')!r} (config group {name})")
    if len({tuple(b) for b in _ct_block_structures(qcfg)}) > 1:
        _refuse("compressed-tensors FP8 with several block structures")


def _ct_block_structures(qcfg: dict[str, Any]) -> list[list[int]]:
    return [g["weights"]["block_structure"] for g in (qcfg.get("config_groups") or {}).values()
            if (g.get("weights") or {}).get("block_structure")]


def _check_gptq(qcfg: dict[str, Any]) -> None:
    fmt = qcfg.get("checkpoint_format")
    if fmt not in (None, "gptq", "gptq_v2"):
        _refuse(f"gptq checkpoint_format={fmt!r}")
    rules = [qcfg] + [r for k, r in (qcfg.get("dynamic") or {}).items() if not k.startswith("-:")]
    for rule in rules:
        if rule.get("bits", 4) not in (4, 8):
            _refuse(f"gptq bits={rule.get('bits')!r} (4 or 8 are read)")


def _check_awq(qcfg: dict[str, Any]) -> None:
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if bits != 4:
        _refuse(f"awq bits={bits!r} (4 is read)")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        _refuse(f"awq version={version!r} (the GEMM packing is read)")
    if qcfg.get("zero_point") is False:
        _refuse("awq zero_point=false")


# --------------------------------------------------------------------------- dequantize


def dequantize(tensors: dict[str, torch.Tensor], qcfg: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """One block's tensors with every quantized linear turned into a float32 ``.weight``.

    Other tensors (norms, biases, modules left unquantized) pass unchanged; quantization
    side tensors (zeros, scales, g_idx, activation and KV-cache scales) are dropped.
    """
    if qcfg is None:
        return dict(tensors)
    method = str(qcfg.get("quant_method", "")).lower()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = tensor
    out: dict[str, torch.Tensor] = {}
    for module, parts in by_module.items():
        prefix = f"{module}." if module else ""
        if "qweight" in parts:
            rest = {k: v for k, v in parts.items() if k not in _INT_LEAVES}
            out[f"{prefix}weight"] = _dequantize_int(module, parts, method, qcfg)
        elif "weight_scale" in parts or "weight_scale_inv" in parts:
            rest = {k: v for k, v in parts.items() if k not in _FP8_LEAVES}
            out[f"{prefix}weight"] = _dequantize_fp8(module, parts, method, qcfg)
        else:
            rest = parts
        if method in ("fp8", "compressed-tensors"):
            rest = {k: v for k, v in rest.items() if k not in _FP8_SERVING_ONLY}
        out.update({f"{prefix}{leaf}": tensor for leaf, tensor in rest.items()})
    return out


def _dequantize_int(module: str, parts: dict[str, torch.Tensor], method: str,
                    qcfg: dict[str, Any]) -> torch.Tensor:
    if method == "gptq":
        return _dequantize_gptq(module, parts, qcfg)
    if method == "awq":
        return _dequantize_awq(module, parts, qcfg)
    raise ModelFolderError(f"{module} holds a qweight but the checkpoint's quant_method is {method!r}")


def _missing(module: str, parts: dict[str, torch.Tensor], needed: tuple[str, ...]) -> None:
    absent = [leaf for leaf in needed if leaf not in parts]
    if absent:
        raise ModelFolderError(
            f"{module} is quantized but has no {', '.join(absent)} tensor(s); "
            "the checkpoint is incomplete or not in the format its quantization_config names"
        )


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] int32 packed along rows -> [R * 32/bits, C] ints (row ``r*f + j`` at bits ``j*bits``)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] int32 packed along columns -> [R, C * 32/bits]; ``order[c]`` is the slot of column c."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        values = values[..., list(order)]
    return values.reshape(packed.shape[0], -1)


def _group_of_rows(rows: int, group_size: int) -> torch.Tensor:
    size = rows if group_size in (-1, 0, None) else int(group_size)
    return torch.arange(rows) // size


def gptq_module_settings(qcfg: dict[str, Any], module: str) -> dict[str, Any]:
    """bits, group_size and sym of ``module``: the base config, or the first matching
    positive ``dynamic`` rule (vLLM's ``get_dynamic_override``: ``re.match``, first wins)."""
    settings = {"bits": qcfg.get("bits", 4), "group_size": qcfg.get("group_size", -1),
                "sym": qcfg.get("sym", True)}
    for pattern, rule in (qcfg.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                break
        elif re.match(pattern.removeprefix("+:"), module):
            settings.update({k: rule[k] for k in settings if k in rule})
            break
    return settings


def _dequantize_gptq(module: str, parts: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> torch.Tensor:
    _missing(module, parts, ("qweight", "scales"))
    settings = gptq_module_settings(qcfg, module)
    bits = int(settings["bits"])
    q = unpack_rows(parts["qweight"], bits)
    scales = parts["scales"].float()
    if "g_idx" in parts:
        groups = parts["g_idx"].long()
        q = q[: groups.numel()]
    else:
        groups = _group_of_rows(q.shape[0], settings["group_size"])
    if settings["sym"]:
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        _missing(module, parts, ("qzeros",))
        offset = 0 if qcfg.get("checkpoint_format") == "gptq_v2" else 1  # v1 stores zero - 1
        zeros = (unpack_cols(parts["qzeros"], bits)[:, : scales.shape[1]] + offset).float()
    weight = (q.float() - zeros[groups]) * scales[groups]
    return weight.t().contiguous()


def _dequantize_awq(module: str, parts: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> torch.Tensor:
    _missing(module, parts, ("qweight", "qzeros", "scales"))
    q = unpack_cols(parts["qweight"], 4, _AWQ_ORDER)
    zeros = unpack_cols(parts["qzeros"], 4, _AWQ_ORDER).float()
    scales = parts["scales"].float()
    groups = _group_of_rows(q.shape[0], qcfg.get("group_size", qcfg.get("q_group_size", -1)))
    weight = (q.float() - zeros[groups]) * scales[groups]
    return weight.t().contiguous()


def _fp8_block(method: str, qcfg: dict[str, Any]) -> list[int] | None:
    if method == "fp8":
        return qcfg.get("weight_block_size")
    structures = _ct_block_structures(qcfg)
    return structures[0] if structures else None


def _dequantize_fp8(module: str, parts: dict[str, torch.Tensor], method: str,
                    qcfg: dict[str, Any]) -> torch.Tensor:
    _missing(module, parts, ("weight",))
    weight = parts["weight"].float()
    scale = parts.get("weight_scale_inv", parts.get("weight_scale")).float()
    rows, cols = weight.shape
    if scale.numel() == 1:
        return weight * scale.reshape(())
    if scale.numel() == rows and (scale.dim() == 1 or scale.shape[-1] == 1):
        return weight * scale.reshape(rows, 1)
    block = _fp8_block(method, qcfg)
    if block is None or scale.dim() != 2:
        raise ModelFolderError(
            f"{module} has a weight scale of shape {list(scale.shape)} for a {rows}x{cols} weight, "
            "neither per-tensor, per-channel nor block-wise with a declared block size"
        )
    bn, bk = block
    expected = (-(-rows // bn), -(-cols // bk))
    if tuple(scale.shape) != expected:
        raise ModelFolderError(
            f"{module} has a block scale of shape {list(scale.shape)}; a {rows}x{cols} weight in "
            f"{bn}x{bk} blocks needs {list(expected)}"
        )
    full = scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :cols]
    return weight * full
