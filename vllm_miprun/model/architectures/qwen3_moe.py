"""Qwen3-MoE: block i is sparse iff i is not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0`` (and the model has experts).

After pruning every kept block must keep its dense/sparse kind. With
``decoder_sparse_step = 1`` every block is sparse unless listed in ``mlp_only_layers``,
so any pattern of kinds is expressible: the renumbered config lists the dense kept
blocks there, and sets the step to 1 when it was larger.
"""

from __future__ import annotations

from typing import Any

from vllm_miprun.model.architectures.base import Architecture, resolved, resolved_config


def is_sparse(index: int, mlp_only: set[int], step: int, num_experts: int) -> bool:
    """transformers' and vLLM's rule for a sparse (MoE) block."""
    return index not in mlp_only and num_experts > 0 and (index + 1) % step == 0


def renumber_sparse_blocks(old: dict[str, Any], new: dict[str, Any], kept: list[int]) -> None:
    cfg = resolved_config(old)
    step = int(resolved(old, "decoder_sparse_step", cfg) or 1)
    mlp_only = set(resolved(old, "mlp_only_layers", cfg) or [])
    num_experts = int(resolved(old, "num_experts", cfg) or 0)
    dense = [new_i for new_i, old_i in enumerate(kept) if not is_sparse(old_i, mlp_only, step, num_experts)]
    if num_experts == 0:
        return  # every block is dense whatever the indices
    if step != 1:
        new["decoder_sparse_step"] = 1
    if dense or "mlp_only_layers" in old:
        new["mlp_only_layers"] = dense


QWEN3_MOE = Architecture(family="Qwen3-MoE", architectures=("Qwen3MoeForCausalLM",),
                         renumbered=("mlp_only_layers", "decoder_sparse_step"), renumber=renumber_sparse_blocks)
