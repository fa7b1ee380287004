"""A model fingerprint that identifies the weights, not the path.

It hashes config.json, every safetensors header (names, dtypes, shapes, offsets) and a
sample of every tensor's bytes: the first and last 4 KiB of its data. Rewriting weights
in place changes the samples even when shapes stay the same; reading 8 KiB a tensor keeps
it fast for multi-GB checkpoints. Each shard is checked against its size first
(``checkpoint.read_shard_header``), so a damaged shard is refused, never fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_miprun.model.checkpoint import read_config, read_shard_header, safetensors_files

SAMPLE_BYTES = 4096


def model_fingerprint(model_dir: str | Path) -> str:
    digest = hashlib.sha256()
    config = read_config(model_dir)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for file in safetensors_files(model_dir):
        digest.update(file.name.encode())
        _hash_safetensors_file(file, digest)
    return "sha256:" + digest.hexdigest()


def _hash_safetensors_file(file: Path, digest) -> None:
    header_bytes, header = read_shard_header(file)
    digest.update(header_bytes)
    data_start = 8 + len(header_bytes)
    with open(file, "rb") as handle:
        for name in sorted(header):
            begin, end = header[name]["data_offsets"]
            for offset in sorted({begin, max(begin, end - SAMPLE_BYTES)}):
                handle.seek(data_start + offset)
                digest.update(handle.read(min(SAMPLE_BYTES, end - offset)))
