"""The KV-cache layouts of the pruned model and of the full one, as vLLM computes them.

vLLM groups attention layers by type (full, sliding window) into KV-cache groups, pads
an uneven mix, and sizes one shared block pool: ``num_blocks = memory // bytes per
block``, and a request at ``max_model_len`` takes a number of blocks from each group. So
the KV capacity gained by pruning is not L/K wherever layer types mix (Gemma 2/3,
Cohere 2). In the worker, after the K-block model is built, :func:`kv_layouts` takes
each attention layer's own ``KVCacheSpec``, builds the full model's by giving each
pruned block the spec of a kept block of its layer type, and runs vLLM's grouping on
both. The metrics exporter turns the two layouts and the engine's block count into the
capacity ratio (:func:`vllm_miprun.core.gains.kv_capacity_ratio`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

from vllm.logger import init_logger

from vllm_miprun.model.architectures.base import resolved
from vllm_miprun.model.remap import layer_index

logger = init_logger(f"vllm.{__name__}")

PROBE_BLOCKS = 1024  # any block count: blocks per request do not depend on it


def attention_layers(vllm_config) -> dict[str, Any]:
    """The built model's attention layers that own a KV cache, as the model runner finds
    them (layers that share another's KV cache are left out)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return {name: layer for name, layer in get_layers_from_vllm_config(vllm_config, AttentionLayerBase).items()
            if not getattr(layer, "kv_sharing_target_layer_name", None)}


def layer_specs(vllm_config, layers: dict[str, Any]) -> dict[str, Any]:
    """{layer name: KVCacheSpec} as each layer declares it."""
    specs = {name: layer.get_kv_cache_spec(vllm_config) for name, layer in layers.items()}
    return {name: spec for name, spec in specs.items() if spec is not None}


@contextmanager
def layout_resolved(vllm_config, layers: dict[str, Any], specs: dict[str, Any]):
    """The KV-cache memory layout set on the config while inside: the engine core resolves
    it only after the load, from the backends' supported layouts, as done here."""
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout

    cache = vllm_config.cache_config
    if cache.kv_cache_layout is not None:
        yield
        return
    backends = {layer.get_attn_backend() for layer in layers.values() if hasattr(layer, "get_attn_backend")}
    names = [layout.name for layout in get_supported_kv_cache_layouts(backends)]
    try:
        cache.kv_cache_layout = resolve_kv_cache_layout(vllm_config, [names], list(specs.values())).name
        yield
    finally:
        cache.kv_cache_layout = None  # the engine core resolves and sets it for real


def full_specs(pruned: dict[str, Any], kept: list[int], num_blocks: int,
               layer_types: list[str] | None) -> dict[str, Any] | None:
    """The full model's specs: a pruned block gets the spec of a kept block of its layer
    type (every kept block's, when the model has one type); None when a type has no
    kept block or a layer name has no index."""
    by_block: dict[int, Any] = {}
    for name, spec in pruned.items():
        new = layer_index(name)
        if new is None or new >= len(kept):
            return None
        by_block[kept[new]] = spec
    kinds = layer_types if layer_types and len(layer_types) == num_blocks else ["any"] * num_blocks
    by_kind = {kinds[block]: spec for block, spec in by_block.items()}
    if kinds == ["any"] * num_blocks and len({repr(s) for s in by_block.values()}) > 1:
        return None  # several specs and no layer types to tell which a pruned block had
    specs = {}
    for block in range(num_blocks):
        spec = by_block.get(block, by_kind.get(kinds[block]))
        if spec is None:
            return None
        specs[f"model.layers.{block}.self_attn.attn"] = spec
    return specs


def layout(vllm_config, specs: dict[str, Any]) -> dict[str, int]:
    """Bytes per block of the shared pool and blocks a ``max_model_len`` request takes,
    from vLLM's own grouping and capacity functions."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    groups, bytes_per_block, config = sized_groups(vllm_config, dict(specs))
    concurrency = get_max_concurrency_for_kv_cache_config(vllm_config, config)
    return {"bytes_per_block": int(bytes_per_block), "groups": len(groups),
            "blocks_per_request": round(config.num_blocks / concurrency)}


def sized_groups(vllm_config, specs: dict[str, Any]) -> tuple[list, int, Any]:
    """(KV cache groups, pool bytes per block, the config of a ``PROBE_BLOCKS`` pool), as
    the engine core plans them."""
    try:  # vLLM 0.33 plans through the platform's KV cache config builder
        from vllm.v1.core.kv_cache_config_builder import get_kv_cache_config_builder
        from vllm.v1.core.kv_cache_planning import _pool_bytes_per_block_from_builder
    except ImportError:  # vLLM 0.32: the same steps as module functions
        from vllm.v1.core.kv_cache_utils import (
            _pool_bytes_per_block, get_kv_cache_config_from_groups, get_kv_cache_groups,
        )
        groups = get_kv_cache_groups(vllm_config, specs)
        bytes_per_block = _pool_bytes_per_block(vllm_config, groups)
        return groups, bytes_per_block, get_kv_cache_config_from_groups(vllm_config, groups,
                                                                        bytes_per_block * PROBE_BLOCKS)
    builder = get_kv_cache_config_builder(vllm_config)
    groups = builder.get_kv_cache_groups(vllm_config, specs)
    bytes_per_block = _pool_bytes_per_block_from_builder(builder, vllm_config, groups)
    return groups, bytes_per_block, builder.get_kv_cache_config_from_groups(vllm_config, groups, PROBE_BLOCKS)


def kv_layouts(vllm_config, read_full_config: Callable[[], dict[str, Any]], kept: list[int],
               num_blocks: int) -> dict | None:
    """{"pruned": layout, "full": layout} for the load report, or None (logged) when the
    full model's layers cannot be told from the kept ones. Never raises."""
    try:
        full_config = read_full_config()
        layers = attention_layers(vllm_config)
        pruned = layer_specs(vllm_config, layers)
        full = full_specs(pruned, kept, num_blocks, resolved(full_config, "layer_types"))
        if not pruned or full is None:
            logger.info("miprun: KV layout of the full model unknown; miprun_kv_capacity_ratio is L/K")
            return None
        with layout_resolved(vllm_config, layers, pruned):
            return {"pruned": layout(vllm_config, pruned), "full": layout(vllm_config, full)}
    except Exception as err:  # noqa: BLE001 - a metric must not stop the load
        logger.warning("miprun: could not compute the KV layouts (%s); miprun_kv_capacity_ratio is L/K", err)
        return None
