"""``miprun_kv_capacity_ratio`` against the engine: the KV tokens vLLM itself reports for
the pruned model over those it reports for the full model, in the same KV memory.

Pure: the ratio from two layouts, with a fixed KV size and with a pool that the freed
weights enlarge. Engine: a Llama (one layer type: about L/K, less the floor of whole
blocks) and a Gemma 2 pruned to an uneven mix of sliding and full layers, where vLLM
groups layers by type and L/K is wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vllm_miprun.core.gains import kv_capacity_ratio

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402

KV_BYTES = 16 * 2**20


def test_ratio_with_a_fixed_kv_size_counts_whole_blocks():
    pruned = {"bytes_per_block": 6 * 1024, "blocks_per_request": 4}
    full = {"bytes_per_block": 8 * 1024, "blocks_per_request": 4}
    memory = 100 * 1024
    # 16 blocks pruned (engine), 12 full: 16/12, not 8/6 exactly once the floor bites
    assert kv_capacity_ratio(pruned, full, 16, memory) == pytest.approx(16 / 12)
    assert kv_capacity_ratio(pruned, full, None, memory) == pytest.approx(16 / 12)
    # the engine's own block count wins over what the memory would hold
    assert kv_capacity_ratio(pruned, full, 15, memory) == pytest.approx(15 / 12)
    # a memory that holds a full block but not a pruned one: unknown, not 0
    assert kv_capacity_ratio({**pruned, "bytes_per_block": 9 * 1024}, full, None, 8 * 1024) is None


def test_ratio_counts_blocks_per_request_of_each_layout():
    """Grouped layouts: a request at max_model_len takes more blocks of one than the other."""
    pruned = {"bytes_per_block": 4096, "blocks_per_request": 6}
    full = {"bytes_per_block": 4096, "blocks_per_request": 8}
    assert kv_capacity_ratio(pruned, full, 100, 100 * 4096) == pytest.approx(8 / 6)


def test_freed_weights_enlarge_the_pool_where_the_kv_size_is_not_fixed():
    layout = {"bytes_per_block": 1000, "blocks_per_request": 1}
    # the pruned engine holds 300 blocks; the full model had 100_000 bytes less for KV
    ratio = kv_capacity_ratio(layout, layout, 300, None, freed_bytes=100_000)
    assert ratio == pytest.approx(300 / 200)
    # the pool is known to one block, so the full model's is taken from the block's middle:
    # 300.5 blocks' bytes - 100_400 = 200_100 bytes hold 200 full blocks, not 199
    assert kv_capacity_ratio(layout, layout, 300, None, freed_bytes=100_400) == pytest.approx(300 / 200)
    assert kv_capacity_ratio(layout, layout, None, None) is None


@pytest.mark.engine
@pytest.mark.parametrize("arch, extra", [
    ("llama", {"keep": 0.75, "method": "last"}),
    ("gemma2", {"drop": [2, 4, 6]}),  # keeps 1 sliding (0) and 4 full layers: an uneven mix
])
def test_ratio_matches_the_engines_own_kv_capacity(arch, extra, tiny_llama_dir, tmp_path):
    from engine_kit import run_engines

    model = tiny_llama_dir if arch == "llama" else make_tiny_model(tmp_path / arch, arch=arch)
    base = {"model": str(model), "kv_bytes": KV_BYTES, "max_tokens": 2, "prompts": ["Once upon a time"]}
    full, pruned = run_engines([base, {**base, "load_format": "miprun", "extra": extra}])
    engine_ratio = pruned["kv_cache_size_tokens"] / full["kv_cache_size_tokens"]
    total, kept = full["num_hidden_layers"], pruned["num_hidden_layers"]
    assert pruned["kv_capacity_ratio"] == pytest.approx(engine_ratio, rel=2e-3), (
        json.dumps({"full": full, "pruned": pruned, "L/K": total / kept}))
    if arch == "gemma2":  # the point of reading vLLM's layouts: grouping makes L/K wrong here
        assert engine_ratio != pytest.approx(total / kept, rel=2e-3)
