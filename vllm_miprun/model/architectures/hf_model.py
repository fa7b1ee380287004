"""The decoder blocks of a transformers model, located and pruned through its family."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vllm_miprun.model import remap
from vllm_miprun.model.architectures import Architecture, for_config


def family_of(model: nn.Module) -> Architecture:
    return for_config(_config_dict(model))


def _config_dict(model: nn.Module) -> dict:
    """The model's config as config.json would hold it, naming the class actually built."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    return {**config, "architectures": [type(model).__name__]}


def layers_owner(model: nn.Module, family: Architecture) -> tuple[nn.Module, str]:
    """(module holding the decoder ModuleList, its attribute name)."""
    path, _, attr = family.layers_path.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def decoder_layers(model: nn.Module, family: Architecture | None = None) -> nn.ModuleList:
    owner, attr = layers_owner(model, family or family_of(model))
    return getattr(owner, attr)


def delete_blocks(model: nn.Module, kept: Sequence[int]) -> nn.Module:
    """Keep only blocks ``kept`` of a transformers causal LM, renumbered 0..K-1, in place.

    The config gets the same per-layer fields as the exported checkpoint (sliced
    ``layer_types`` and the like, from :func:`remap.config_overrides`), so the model
    attends exactly as a pruned checkpoint loaded from disk would.
    """
    family = family_of(model)
    owner, attr = layers_owner(model, family)
    layers = getattr(owner, attr)
    overrides = remap.config_overrides(_config_dict(model), list(kept))
    kept = overrides[remap.KEPT_FIELD]
    setattr(owner, attr, nn.ModuleList([layers[i] for i in kept]))
    for new, layer in enumerate(getattr(owner, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new  # index into the KV cache
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return model
