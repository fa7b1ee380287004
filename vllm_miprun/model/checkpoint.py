"""The one reader of checkpoint facts: config, shard list, safetensors headers, bytes per block.

Everything that asks "which files", "what config" or "how many bytes does block i hold"
(fingerprint, calibration, loader, export, metrics, profile, benchmarks) asks here, so
they can never disagree. Headers are read without touching tensor data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_miprun.errors import ModelFolderError

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` as a dict."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(
            f"{model_dir} has no config.json; expected a Hugging Face model folder "
            "(config.json plus *.safetensors)"
        )
    return json.loads(path.read_text())


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors shards: the index's when there is one, else every
    ``*.safetensors`` but Mistral's duplicate ``consolidated*`` files."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise ModelFolderError(
            f"{model_dir} holds no *.safetensors files; convert the checkpoint to safetensors "
            "(pickled .bin weights are never loaded)"
        )
    return files


def missing_shards(model_dir: str | Path) -> list[str]:
    """Shards the index names that are not on disk (a hub snapshot fetched only in part)."""
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return []
    names = set(json.loads(index.read_text())["weight_map"].values())
    return sorted(name for name in names if not (Path(model_dir) / name).is_file())


def tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name of the checkpoint: the index's weight map when there is one (so a
    snapshot fetched only in part still has all its names), else the safetensors headers."""
    index = Path(model_dir) / INDEX_NAME
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    return sorted(tensor_bytes(safetensors_files(model_dir)))


def read_header(path: str | Path) -> dict[str, dict]:
    """The safetensors header {name: {dtype, shape, data_offsets}}, without tensor data."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelFolderError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_bytes(files: Iterable[str | Path], dtype_bytes: int | None = None) -> dict[str, int]:
    """Bytes of every tensor, from the headers alone: as stored on disk, or at
    ``dtype_bytes`` per element (the dtype a run converts the weights to)."""
    sizes: dict[str, int] = {}
    for path in files:
        for name, info in read_header(path).items():
            if dtype_bytes is None:
                start, end = info["data_offsets"]
                sizes[name] = end - start
            else:
                sizes[name] = math.prod(info["shape"]) * dtype_bytes
    return sizes


def bytes_by_block(files: Iterable[str | Path], layer_index,
                   dtype_bytes: int | None = None) -> tuple[dict[int, int], int]:
    """({block index: bytes}, bytes outside any block); ``layer_index(name)`` names the block.
    ``dtype_bytes`` as for :func:`tensor_bytes`."""
    blocks: dict[int, int] = {}
    other = 0
    for name, size in tensor_bytes(files, dtype_bytes).items():
        index = layer_index(name)
        if index is None:
            other += size
        else:
            blocks[index] = blocks.get(index, 0) + size
    return blocks, other
