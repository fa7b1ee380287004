"""The one reader of checkpoint facts: config, shard list, safetensors headers, bytes per block.

Everything that asks "which files", "what config" or "how many bytes does block i hold"
(fingerprint, calibration, loader, export, metrics, profile, benchmarks) asks here, so
they can never disagree. Headers are read without touching tensor data.

Every header is checked against its file's size before anything uses it
(:func:`read_shard_header`): a damaged shard (garbage header length, a header that is not
JSON, offsets outside the file or inconsistent with dtype x shape, a truncated or padded
data section) is refused in one line naming the file, before any tensor is read,
fingerprinted or handed to an engine. The rules are safetensors' own.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_miprun import strict_json
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
    return _json_object(path, "the model's Hugging Face config")


def read_index(model_dir: str | Path) -> dict[str, Any]:
    """The safetensors index, with its ``weight_map`` (tensor name -> shard file) checked."""
    path = Path(model_dir) / INDEX_NAME
    index = _json_object(path, "a safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFolderError(f"{path} has no weight_map of tensor name -> shard file name (got "
                               f"{type(weight_map).__name__} {str(weight_map)[:80]}); restore the file from the "
                               "model's source")
    bad = next(((name, shard) for name, shard in weight_map.items() if not isinstance(shard, str) or not shard), None)
    if bad is not None:
        raise ModelFolderError(f"{path}: weight_map gives {str(bad[0])[:80]!r} -> {str(bad[1])[:80]}, not a shard "
                               "file name; restore the file from the model's source")
    return index


def read_weight_map(model_dir: str | Path) -> dict[str, str]:
    """The safetensors index's ``weight_map`` (tensor name -> shard file), checked."""
    return read_index(model_dir)["weight_map"]


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the model folder; ``ModelFolderError`` naming it otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise ModelFolderError(f"{path} cannot be read as JSON ({' '.join(str(err).split())[:200]}); expected "
                               f"{what}; restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(data).__name__}, not an object; expected {what}; "
                               "restore the file from the model's source")
    return data


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors shards: the index's when there is one, else every
    ``*.safetensors`` but Mistral's duplicate ``consolidated*`` files."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        return [model_dir / name for name in sorted(set(read_weight_map(model_dir).values()))]
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
    names = set(read_weight_map(model_dir).values())
    return sorted(name for name in names if not (Path(model_dir) / name).is_file())


def tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name of the checkpoint: the index's weight map when there is one (so a
    snapshot fetched only in part still has all its names), else the safetensors headers."""
    index = Path(model_dir) / INDEX_NAME
    if index.is_file():
        return sorted(read_weight_map(model_dir))
    return sorted(tensor_bytes(safetensors_files(model_dir)))


# safetensors' own limit on the header; anything longer is a garbage length.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 32  # more dimensions than any tensor has: a garbled shape
# Bits per element of each safetensors dtype (sub-byte ones pack; a tensor is whole bytes).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def read_header(path: str | Path) -> dict[str, dict]:
    """The safetensors header {name: {dtype, shape, data_offsets}}, without tensor data
    (checked against the file first: see :func:`read_shard_header`)."""
    return read_shard_header(path)[1]


def check_shards(model_dir: str | Path) -> None:
    """Refuse the first damaged shard on disk (one line naming it); shards the index names
    but a partial snapshot lacks are left to the code that fetches them."""
    for path in safetensors_files(model_dir):
        if path.is_file():
            read_shard_header(path)


def read_shard_header(path: str | Path) -> tuple[bytes, dict[str, dict]]:
    """(the header bytes as stored, the parsed header without ``__metadata__``), after
    checking the shard the way safetensors does: a sane header length, a JSON object with
    no duplicate key, every tensor's bytes equal to dtype x shape, tensors packed end to end
    from offset 0, and the file exactly as long as the header says. ``ModelFolderError``
    naming the file otherwise."""
    path = Path(path)
    size = os.stat(path).st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise _damaged(path, f"it is {size} bytes long, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise _damaged(path, f"its header length field says {length} bytes, but the file has "
                                 f"{size - 8} bytes after it")
        header_bytes = handle.read(length)
    try:
        header = strict_json.loads(header_bytes)
    except (ValueError, RecursionError) as err:
        raise _damaged(path, f"its header is not valid JSON ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise _damaged(path, "its header is not a JSON object of tensors")
    _check_layout(path, header, size - 8 - length)
    return header_bytes, header


def _check_layout(path: Path, header: dict, data_bytes: int) -> None:
    spans = []
    for name, info in header.items():
        spans.append((*_tensor_span(path, name, info), name))
    for begin, end, name in spans:
        if end > data_bytes:
            raise _damaged(path, f"tensor {name[:100]!r} ends at byte {end} of the data, but the file holds only "
                                 f"{data_bytes} (truncated)")
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _damaged(path, f"tensor {name[:100]!r} starts at byte {begin} of the data, expected {position}")
        position = end
    if position != data_bytes:
        raise _damaged(path, f"its header describes {position} bytes of tensor data but the file holds "
                             f"{data_bytes} (truncated or padded)")


def _tensor_span(path: Path, name: str, info: Any) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, checked against its dtype and shape."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    info = info if isinstance(info, dict) else {}
    shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if (bits is None or not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(whole, shape))
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(whole, offsets))):
        raise _damaged(path, f"tensor {name[:100]!r} has no valid dtype, shape and data_offsets ({info!r:.200})")
    begin, end = offsets
    stored_bits = math.prod(shape) * bits
    if end < begin or stored_bits % 8 or stored_bits // 8 != end - begin:
        raise _damaged(path, f"tensor {name[:100]!r} ({dtype} {shape!r:.100}) needs {stored_bits} bits but "
                             f"its data_offsets span {end - begin} bytes")
    return begin, end


def _damaged(path: Path, why: str) -> ModelFolderError:
    return ModelFolderError(f"safetensors file {path} is damaged: {why}; download or save the "
                            "file again")


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
