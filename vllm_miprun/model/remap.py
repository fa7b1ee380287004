"""Rewrite a Hugging Face config and weight names for a model that keeps some blocks.

Pure functions, no vLLM import: the loader, the exporter and the tests share them.
Block ``kept[i]`` of the full model becomes block ``i`` of the pruned one, so every
per-layer list is sliced and every index-based field is renumbered, or the model is
refused with an error that names the field.
"""

from __future__ import annotations

import re
from typing import Any

from vllm_miprun.options import OptionError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)
KEPT_FIELD = "miprun_kept_layers"
FULL_FIELD = "miprun_num_blocks_full"

# Fields whose meaning depends on layer indices in ways we cannot renumber.
_REFUSED_INDEX_FIELDS = (
    "first_k_dense_replace",
    "no_rope_layers",
    "moe_layer_freq",
    "num_kv_shared_layers",
    "kv_sharing",
    "mlp_only_layers",
    "decoder_sparse_step",
    "interleave_moe_layer_step",
    "global_attn_every_n_layers",
    "cross_attention_layers",
    "full_attention_interval",
)
# Lists that are not per-layer even when their length happens to equal the block count.
_NOT_PER_LAYER = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids")
_WINDOWED_ARCHS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")

_LAYER_NAME = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def check_architecture(hf_config: dict[str, Any]) -> str:
    """The single supported architecture of ``hf_config``; refuse anything else."""
    archs = hf_config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise OptionError(
            f"miprun supports the architectures {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"this model declares architectures={archs!r}. Serve it without "
            "--load-format miprun, or open an issue for this architecture"
        )
    return archs[0]


def check_kept(kept: list[int] | tuple[int, ...], num_blocks: int) -> list[int]:
    """Sorted, unique, in-range, non-empty kept indices (a tampered plan is refused)."""
    kept = list(kept)
    if not kept:
        raise OptionError("the plan keeps no blocks; a model needs at least one block")
    bad = [k for k in kept if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_blocks]
    if bad:
        raise OptionError(f"kept block indices must be integers in [0, {num_blocks}), got {bad}")
    if kept != sorted(set(kept)):
        raise OptionError(f"kept block indices must be sorted and unique, got {kept}")
    return kept


def remap_config(hf_config: dict[str, Any], kept: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """A new config dict describing the model that keeps only blocks ``kept``.

    Already-pruned configs are refused: indices are always relative to the full model.
    """
    arch = check_architecture(hf_config)
    if KEPT_FIELD in hf_config:
        raise OptionError(
            f"this config is already pruned ({KEPT_FIELD}={hf_config[KEPT_FIELD]}); "
            "prune the original checkpoint instead"
        )
    num_blocks = int(hf_config["num_hidden_layers"])
    kept = check_kept(kept, num_blocks)
    _refuse_index_fields(hf_config)
    new = dict(hf_config)
    for key, value in hf_config.items():
        if isinstance(value, list) and len(value) == num_blocks and key not in _NOT_PER_LAYER:
            new[key] = [value[k] for k in kept]
    new["num_hidden_layers"] = len(kept)
    if arch in _WINDOWED_ARCHS:
        _remap_max_window_layers(hf_config, new, kept)
    new[KEPT_FIELD] = kept
    new[FULL_FIELD] = num_blocks
    return new


def config_overrides(hf_config: dict[str, Any], kept: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Only the fields :func:`remap_config` changes or adds (for vLLM's hf_overrides)."""
    new = remap_config(hf_config, kept)
    return {k: v for k, v in new.items() if k not in hf_config or hf_config[k] != v}


def _is_neutral(value: Any) -> bool:
    """Absent-equivalent values (None, 0, False, empty) leave every block alike."""
    return value is None or value is False or value == 0 or value == [] or value == {}


def _refuse_index_fields(hf_config: dict[str, Any]) -> None:
    for name in _REFUSED_INDEX_FIELDS:
        if name in hf_config and not _is_neutral(hf_config[name]):
            raise OptionError(
                f"config field {name}={hf_config[name]!r} picks per-layer behaviour by "
                "block index, which miprun cannot renumber; this model cannot be pruned"
            )
    types = hf_config.get("layer_types")
    num_blocks = int(hf_config["num_hidden_layers"])
    if types is not None and len(types) != num_blocks:
        raise OptionError(
            f"config field layer_types has {len(types)} entries but num_hidden_layers="
            f"{num_blocks}; fix config.json before pruning"
        )


def _remap_max_window_layers(old: dict[str, Any], new: dict[str, Any], kept: list[int]) -> None:
    """Qwen2/Qwen3: block i slides iff use_sliding_window and i >= max_window_layers.

    That set is a suffix of the blocks, and a sorted subset of a suffix is a suffix of
    the subset, so the count of kept blocks below the threshold is the new threshold.
    """
    if "max_window_layers" not in old:
        return
    threshold = int(old["max_window_layers"])
    new["max_window_layers"] = sum(1 for k in kept if k < threshold)
    if not old.get("use_sliding_window") or old.get("sliding_window") is None:
        return
    types = new.get("layer_types")
    expected = [
        "sliding_attention" if i >= new["max_window_layers"] else "full_attention"
        for i in range(len(kept))
    ]
    if types is not None and list(types) != expected:
        raise OptionError(
            "config fields layer_types and max_window_layers disagree after pruning "
            f"(layer_types={types}, max_window_layers={new['max_window_layers']}); "
            "this sliding-window layout cannot be expressed for the pruned model"
        )


def renamed_weight(name: str, kept: list[int] | tuple[int, ...] | dict[int, int]) -> str | None:
    """``model.layers.{orig}.x`` -> ``model.layers.{new}.x``; None for a pruned block.

    Names outside ``model.layers`` (embeddings, final norm, lm_head) pass unchanged.
    ``kept`` may be the sorted kept list or a prebuilt {orig: new} map.
    """
    match = _LAYER_NAME.match(name)
    if match is None:
        return name
    new_index = _index_map(kept).get(int(match.group(2)))
    if new_index is None:
        return None
    return f"{match.group(1)}{new_index}{match.group(3)}"


def layer_index(name: str) -> int | None:
    """The block index in a ``model.layers.N.`` weight name, else None."""
    match = _LAYER_NAME.match(name)
    return int(match.group(2)) if match else None


def _index_map(kept: list[int] | tuple[int, ...] | dict[int, int]) -> dict[int, int]:
    if isinstance(kept, dict):
        return kept
    return {orig: new for new, orig in enumerate(kept)}


def index_map(kept: list[int] | tuple[int, ...]) -> dict[int, int]:
    """{original block index: new block index} for the kept blocks."""
    return _index_map(kept)
