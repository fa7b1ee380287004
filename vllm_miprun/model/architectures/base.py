"""What one architecture family needs the pruner to know, and helpers the families share.

An :class:`Architecture` says where the decoder blocks live (in the weights and in the
transformers model), which per-layer config fields transformers derives when
``config.json`` omits them, and how index-valued fields are renumbered for the kept
blocks. Everything else (embedding scaling, rotary variants, soft-capping, extra norms)
is left to transformers' own modules, which the block runner calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_miprun.options import OptionError

# Fields that pick per-layer behaviour by block index. A family that knows how to
# renumber one lists it in ``Architecture.renumbered``; anywhere else a non-neutral
# value is refused, since a silently wrong renumbering would change what blocks do.
INDEX_FIELDS = (
    "first_k_dense_replace",
    "no_rope_layers",
    "moe_layer_freq",
    "moe_layers",
    "num_kv_shared_layers",
    "kv_sharing",
    "mlp_only_layers",
    "decoder_sparse_step",
    "interleave_moe_layer_step",
    "global_attn_every_n_layers",
    "cross_attention_layers",
    "full_attention_interval",
    "sliding_window_pattern",
)

# (old config, new config being built, kept indices) -> None; edits ``new`` in place.
Renumber = Callable[[dict[str, Any], dict[str, Any], list[int]], None]


@dataclass(frozen=True)
class HealSite:
    """Where a block's last addition to the residual stream comes from, and where a heal map
    acting on it folds (``vllm_miprun.pipeline.heal``; the algebra is in ``core.heal_math``)."""

    # Submodule of the decoder layer whose output, times the config field ``multiplier`` when
    # one is named, is what the block adds to the residual stream last: the map acts on it.
    output: str = "mlp"
    multiplier: str | None = None
    # Module the map folds into. A linear layer takes any map (``T @ W``, and ``T @ b``), exact
    # when only scalars (``multiplier``) lie between it and ``output``. A norm whose gain is
    # ``gain_offset + w`` takes a diagonal map only: ``w' = t·(gain_offset + w) − gain_offset``.
    fold_into: str = "mlp.down_proj"
    gain_offset: float | None = None  # None: ``fold_into`` is a linear layer

    @property
    def folds_into_norm(self) -> bool:
        return self.gain_offset is not None


@dataclass(frozen=True)
class Architecture:
    """One family's quirks, as the pruner needs them."""

    family: str
    architectures: tuple[str, ...]
    # Weight-name prefix of decoder block N is f"{layers_prefix}{N}."
    layers_prefix: str = "model.layers."
    # Attribute path of the decoder layers' ModuleList in the transformers model.
    layers_path: str = "model.layers"
    # Per-layer fields transformers derives when config.json leaves them out.
    derived: tuple[str, ...] = ()
    # Index fields handled by ``renumber`` (not refused).
    renumbered: tuple[str, ...] = ()
    renumber: Renumber | None = None
    # Attention implementation the block runner and the tests use (eager where sdpa
    # would silently drop a feature, e.g. attention-logit soft-capping).
    attn_implementation: str = "sdpa"
    # Static refusal before any work: (config) -> None, raising OptionError.
    check: Callable[[dict[str, Any]], None] | None = None
    # Where heal=linear catches the block's MLP contribution and folds its map (default:
    # Llama-style, the MLP output added as it leaves ``mlp.down_proj``).
    heal_site: HealSite = HealSite()


def is_neutral(value: Any) -> bool:
    """Absent-equivalent values (None, 0, False, empty) leave every block alike."""
    return value is None or value is False or value == 0 or value == [] or value == {}


def refuse_field(name: str, value: Any, why: str) -> OptionError:
    """The one-line refusal for an index field that cannot be renumbered."""
    return OptionError(f"config field {name}={value!r} {why}; miprun cannot prune this model "
                       "(serve it without --load-format miprun)")


def resolved_config(hf_config: dict[str, Any]):
    """The transformers config object for ``hf_config``: defaults and derived fields filled in."""
    from transformers import AutoConfig

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(hf_config["model_type"], **fields)


def resolved(hf_config: dict[str, Any], name: str, resolved_cfg=None) -> Any:
    """``hf_config[name]``, or the value transformers gives it when config.json omits it."""
    if name in hf_config:
        return hf_config[name]
    return getattr(resolved_cfg if resolved_cfg is not None else resolved_config(hf_config), name, None)


def kept_below(kept: list[int], threshold: int) -> int:
    """How many kept blocks have an index below ``threshold`` (a prefix count)."""
    return sum(1 for k in kept if k < threshold)


def renumbered_indices(indices: list[int], kept: list[int]) -> list[int]:
    """New indices of the kept blocks among ``indices`` (old indices)."""
    chosen = set(indices)
    return [new for new, old in enumerate(kept) if old in chosen]
