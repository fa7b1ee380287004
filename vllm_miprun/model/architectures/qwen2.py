"""Qwen2: block i slides iff use_sliding_window and i >= max_window_layers."""

from __future__ import annotations

from typing import Any

from vllm_miprun.model.architectures.base import Architecture, kept_below
from vllm_miprun.options import OptionError


def renumber_max_window_layers(old: dict[str, Any], new: dict[str, Any], kept: list[int]) -> None:
    """The sliding blocks are a suffix, and a sorted subset of a suffix is a suffix of the
    subset, so the count of kept blocks below the threshold is the new threshold."""
    if "max_window_layers" not in old:
        return
    new["max_window_layers"] = kept_below(kept, int(old["max_window_layers"]))
    if not old.get("use_sliding_window") or old.get("sliding_window") is None:
        return
    types = new.get("layer_types")
    expected = ["sliding_attention" if i >= new["max_window_layers"] else "full_attention"
                for i in range(len(kept))]
    if types is not None and list(types) != expected:
        raise OptionError(
            "config fields layer_types and max_window_layers disagree after pruning "
            f"(layer_types={types}, max_window_layers={new['max_window_layers']}); "
            "this sliding-window layout cannot be expressed for the pruned model"
        )


QWEN2 = Architecture(family="Qwen2", architectures=("Qwen2ForCausalLM",), renumber=renumber_max_window_layers)
