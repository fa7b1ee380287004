"""Llama 4 (text, ``Llama4ForCausalLM``): NoPE blocks (``no_rope_layers``, a per-layer
list, derived when absent), chunked attention (``layer_types``, derived) and MoE blocks.

transformers picks MoE blocks from ``moe_layers`` (indices); vLLM from
``interleave_moe_layer_step`` (block i is MoE iff ``(i + 1) % step == 0``). The pruned
config lists the renumbered ``moe_layers`` and keeps a step that gives the same kinds
(the old one, or 1 when every kept block is MoE); when no step does, it is refused.
"""

from __future__ import annotations

from typing import Any

from vllm_miprun.model.architectures.base import (
    Architecture, refuse_field, renumbered_indices, resolved, resolved_config,
)


def renumber_moe_layers(old: dict[str, Any], new: dict[str, Any], kept: list[int]) -> None:
    cfg = resolved_config(old)
    moe = renumbered_indices(list(resolved(old, "moe_layers", cfg) or []), kept)
    step = int(resolved(old, "interleave_moe_layer_step", cfg) or 0)
    new["moe_layers"] = moe

    def by_step(s: int) -> list[int]:
        return [i for i in range(len(kept)) if s > 0 and (i + 1) % s == 0]

    if by_step(step) == moe:
        return
    if by_step(1) == moe:
        new["interleave_moe_layer_step"] = 1
        return
    raise refuse_field("interleave_moe_layer_step", step,
                       f"cannot place the kept MoE blocks {moe} after pruning (vLLM reads MoE blocks from it)")


LLAMA4 = Architecture(family="Llama 4 (text)", architectures=("Llama4ForCausalLM",),
                      derived=("no_rope_layers", "layer_types"),
                      renumbered=("no_rope_layers", "moe_layers", "interleave_moe_layer_step"),
                      renumber=renumber_moe_layers)
