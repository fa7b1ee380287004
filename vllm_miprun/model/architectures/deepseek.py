"""DeepSeek-V2/V3: the first ``first_k_dense_replace`` blocks are dense, the rest MoE.

The dense blocks are a prefix, and the kept ones among them stay a prefix of the kept
blocks, so the new threshold is the count of kept blocks below the old one. vLLM also
reads ``moe_layer_freq`` (block i is MoE iff i >= k and i % freq == 0); transformers
ignores it. A freq other than 1 does not survive renumbering, so it is refused.
DeepSeek-V3's multi-token-prediction layers sit after the stack (index >=
``num_hidden_layers``); they belong to the full model's last block, so a pruned model
drops them and says so with ``num_nextn_predict_layers = 0``.
"""

from __future__ import annotations

from typing import Any

from vllm_miprun.model.architectures.base import Architecture, kept_below, refuse_field, resolved


def check_moe_layer_freq(config: dict[str, Any]) -> None:
    freq = config.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        raise refuse_field("moe_layer_freq", freq, "makes every freq-th block MoE by index, which pruning breaks")


def renumber_dense_prefix(old: dict[str, Any], new: dict[str, Any], kept: list[int]) -> None:
    first_dense = int(resolved(old, "first_k_dense_replace") or 0)
    new["first_k_dense_replace"] = kept_below(kept, first_dense)
    if old.get("num_nextn_predict_layers"):
        new["num_nextn_predict_layers"] = 0


DEEPSEEK_V2 = Architecture(family="DeepSeek-V2", architectures=("DeepseekV2ForCausalLM",),
                           renumbered=("first_k_dense_replace", "moe_layer_freq"),
                           renumber=renumber_dense_prefix, check=check_moe_layer_freq)
DEEPSEEK_V3 = Architecture(family="DeepSeek-V3", architectures=("DeepseekV3ForCausalLM",),
                           renumbered=("first_k_dense_replace", "moe_layer_freq"),
                           renumber=renumber_dense_prefix, check=check_moe_layer_freq)
