"""Rewrite a Hugging Face config and weight names for a model that keeps some blocks.

No vLLM import: the loader, the exporter and the tests share them. Only :func:`pruned_fields`
reads files (the tensor names a quantization config is renumbered against).
Block ``kept[i]`` of the full model becomes block ``i`` of the pruned one, so every
per-layer list is sliced (including the ones transformers derives when config.json
omits them) and every index-based field is renumbered by the model's family
(:mod:`vllm_miprun.model.architectures`), or the model is refused with an error that
names the field.
"""

from __future__ import annotations

from typing import Any

from vllm_miprun.model.architectures import LAYER_NAME, SUPPORTED_ARCHITECTURES, for_config
from vllm_miprun.model.architectures.base import INDEX_FIELDS, is_neutral, refuse_field, resolved_config
from vllm_miprun.options import OptionError
from vllm_miprun.model.quant_remap import quantization_overrides

__all__ = ["APPROXIMATE_EXPERTS", "FULL_FIELD", "KEPT_FIELD", "SUPPORTED_ARCHITECTURES", "check_architecture", "check_kept",
           "config_overrides", "index_map", "pruned_fields", "layer_index", "remap_config", "renamed_weight",
           "renumber_approximate_experts"]

KEPT_FIELD = "miprun_kept_layers"
FULL_FIELD = "miprun_num_blocks_full"

# vLLM >= 0.33 (MoNE checkpoints, any MoE family): {block index: substituted expert ids}.
APPROXIMATE_EXPERTS = "approximate_experts"

# Lists that are not per-layer even when their length happens to equal the block count
# (token ids, and lists of block indices, which the family renumbers instead).
_NOT_PER_LAYER = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids",
                  "mlp_only_layers", "moe_layers", "cross_attention_layers")


def check_architecture(hf_config: dict[str, Any]) -> str:
    """The single supported architecture of ``hf_config``; refuse anything else, before any work."""
    family = for_config(hf_config)
    return next(a for a in hf_config["architectures"] if a in family.architectures)


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
    family = for_config(hf_config)
    if KEPT_FIELD in hf_config:
        raise OptionError(
            f"this config is already pruned ({KEPT_FIELD}={hf_config[KEPT_FIELD]}); "
            "prune the original checkpoint instead"
        )
    num_blocks = int(hf_config["num_hidden_layers"])
    kept = check_kept(kept, num_blocks)
    _refuse_index_fields(hf_config, family.renumbered)
    full = _with_derived_fields(hf_config, family.derived)
    new = dict(full)
    for key, value in full.items():
        if isinstance(value, list) and len(value) == num_blocks and key not in _NOT_PER_LAYER:
            new[key] = [value[k] for k in kept]
        elif key in family.derived and isinstance(value, list):  # derived field of the wrong length
            raise OptionError(f"config field {key} has {len(value)} entries but num_hidden_layers="
                              f"{num_blocks}; fix config.json before pruning")
    new["num_hidden_layers"] = len(kept)
    if not is_neutral(full.get(APPROXIMATE_EXPERTS)):
        new[APPROXIMATE_EXPERTS] = renumber_approximate_experts(full[APPROXIMATE_EXPERTS], kept, num_blocks)
    if family.renumber is not None:
        family.renumber(hf_config, new, kept)
    new[KEPT_FIELD] = kept
    new[FULL_FIELD] = num_blocks
    return new


def config_overrides(hf_config: dict[str, Any], kept: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Only the fields :func:`remap_config` changes or adds (for vLLM's hf_overrides)."""
    new = remap_config(hf_config, kept)
    return {k: v for k, v in new.items() if k not in hf_config or hf_config[k] != v}


def pruned_fields(model_dir, hf_config: dict[str, Any], kept: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Every config field a model keeping ``kept`` overrides for vLLM: the per-layer fields
    (:func:`config_overrides`) and the renumbered ``quantization_config``."""
    return {**config_overrides(hf_config, kept), **quantization_overrides(model_dir, hf_config, kept)}


def renumber_approximate_experts(value: Any, kept: list[int], num_blocks: int) -> dict[str, Any]:
    """``approximate_experts`` keyed by the pruned model's block indices; pruned blocks' entries
    go (vLLM matches an MoE layer to its entry by the block index in the layer's name)."""
    if not isinstance(value, dict):
        raise refuse_field(APPROXIMATE_EXPERTS, value, "must map block indices to expert ids")
    new_index = index_map(kept)
    renumbered: dict[str, Any] = {}
    for key, experts in value.items():
        block = int(key) if str(key).isdigit() else -1
        if not 0 <= block < num_blocks:
            raise refuse_field(APPROXIMATE_EXPERTS, value,
                               f"names block {key!r}, not an index in [0, {num_blocks})")
        if block in new_index:
            renumbered[str(new_index[block])] = experts
    return renumbered


def _with_derived_fields(hf_config: dict[str, Any], derived: tuple[str, ...]) -> dict[str, Any]:
    """``hf_config`` plus the per-layer fields transformers derives when config.json omits them,
    read from transformers' own config class so the pruned model attends exactly like the
    full model's kept blocks."""
    missing = [name for name in derived if hf_config.get(name) is None]
    if not missing:
        return hf_config
    resolved = resolved_config(hf_config)
    return {**hf_config, **{name: list(getattr(resolved, name)) for name in missing}}


def _refuse_index_fields(hf_config: dict[str, Any], renumbered: tuple[str, ...]) -> None:
    for name in INDEX_FIELDS:
        if name not in renumbered and name in hf_config and not is_neutral(hf_config[name]):
            raise refuse_field(name, hf_config[name], "picks per-layer behaviour by block index")
    types = hf_config.get("layer_types")
    num_blocks = int(hf_config["num_hidden_layers"])
    if types is not None and len(types) != num_blocks:
        raise OptionError(
            f"config field layer_types has {len(types)} entries but num_hidden_layers="
            f"{num_blocks}; fix config.json before pruning"
        )


def renamed_weight(name: str, kept: list[int] | tuple[int, ...] | dict[int, int]) -> str | None:
    """``<layers>.{orig}.x`` -> ``<layers>.{new}.x``; None for a pruned block.

    ``<layers>`` is any family's block prefix (``model.layers``, ...). Names outside the
    blocks (embeddings, final norm, lm_head) pass unchanged. ``kept`` may be the sorted
    kept list or a prebuilt {orig: new} map.
    """
    match = LAYER_NAME.match(name)
    if match is None:
        return name
    new_index = index_map(kept).get(int(match.group(2)))
    if new_index is None:
        return None
    return f"{match.group(1)}{new_index}{match.group(3)}"


def layer_index(name: str) -> int | None:
    """The block index in a block weight name (``model.layers.N.``, ...), else None."""
    match = LAYER_NAME.match(name)
    return int(match.group(2)) if match else None


def index_map(kept: list[int] | tuple[int, ...] | dict[int, int]) -> dict[int, int]:
    """{original block index: new block index} for the kept blocks."""
    if isinstance(kept, dict):
        return kept
    return {orig: new for new, orig in enumerate(kept)}
