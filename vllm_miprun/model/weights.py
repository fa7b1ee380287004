"""Read only the kept blocks' tensors from a safetensors checkpoint, renumbered.

No vLLM import: the loader and the exporter both use it. A pruned block's tensors are
skipped by name before ``get_tensor``, so their bytes are never read (safetensors
memory-maps the file and reads a tensor's byte range only when asked for it); shard
files that hold nothing but pruned tensors are never opened. Block tensors are recognised
by the block prefixes of the supported families (``model.architectures``), through
``remap.layer_index`` and ``remap.renamed_weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from vllm_miprun.model.checkpoint import bytes_by_block, tensor_bytes
from vllm_miprun.model.remap import index_map, layer_index, renamed_weight


def plan_reads(files: list[Path], kept: list[int]) -> tuple[list[Path], int, int]:
    """(shards to open, bytes to read, bytes skipped), from the headers alone."""
    wanted = set(kept)
    to_open, read_bytes, skipped_bytes = [], 0, 0
    for path in files:
        needed = False
        for name, size in tensor_bytes([path]).items():
            index = layer_index(name)
            if index is None or index in wanted:
                needed = True
                read_bytes += size
            else:
                skipped_bytes += size
        if needed:
            to_open.append(path)
    return to_open, read_bytes, skipped_bytes


def iter_kept_weights(files: list[Path], kept: list[int], renumber: bool = True,
                      skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, "object"]]:
    """Yield (renumbered name, tensor) for non-block tensors and kept blocks only; with
    ``renumber`` off, under the checkpoint's own names. Names ``skip`` accepts (checkpoint
    names: another rank's experts) are not read either."""
    from safetensors import safe_open

    mapping = index_map(kept)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                new_name = renamed_weight(name, mapping)
                if new_name is not None and not (skip and skip(name)):  # skipped before being read
                    yield (new_name if renumber else name), handle.get_tensor(name)


def pruned_weight_bytes(files: list[Path], pruned) -> int:
    """Stored bytes of the ``pruned`` blocks' tensors (safetensors headers only)."""
    blocks, _ = bytes_by_block(files, layer_index)
    return sum(blocks.get(b, 0) for b in set(pruned))
