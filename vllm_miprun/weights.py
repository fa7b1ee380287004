"""Read only the kept blocks' tensors from a safetensors checkpoint, renumbered.

No vLLM import: the loader and the exporter both use it. A pruned block's tensors are
skipped by name before ``get_tensor``, so their bytes are never read (safetensors
memory-maps the file and reads a tensor's byte range only when asked for it); shard
files that hold nothing but pruned tensors are never opened.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from vllm_miprun.options import OptionError
from vllm_miprun.remap import index_map, layer_index, renamed_weight

INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards, from the index when there is one."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise OptionError(
            f"no *.safetensors weights in {model_dir}; miprun reads only safetensors "
            "checkpoints (convert .bin weights with transformers' save_pretrained)"
        )
    return files


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header {name: {dtype, shape, data_offsets}}, without tensor data."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def plan_reads(files: list[Path], kept: list[int]) -> tuple[list[Path], int, int]:
    """(shards to open, bytes to read, bytes skipped), from the headers alone."""
    wanted = set(kept)
    to_open, read_bytes, skipped_bytes = [], 0, 0
    for path in files:
        needed = False
        for name, info in read_header(path).items():
            start, end = info["data_offsets"]
            index = layer_index(name)
            if index is None or index in wanted:
                needed = True
                read_bytes += end - start
            else:
                skipped_bytes += end - start
        if needed:
            to_open.append(path)
    return to_open, read_bytes, skipped_bytes


def iter_kept_weights(files: list[Path], kept: list[int]) -> Iterator[tuple[str, "object"]]:
    """Yield (renumbered name, tensor) for non-block tensors and kept blocks only."""
    from safetensors import safe_open

    mapping = index_map(kept)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                new_name = renamed_weight(name, mapping)
                if new_name is not None:  # skip pruned blocks before reading them
                    yield new_name, handle.get_tensor(name)
