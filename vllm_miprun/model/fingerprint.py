"""A model fingerprint that identifies the weights, not the path.

It hashes config.json, every safetensors header (names, dtypes, shapes, offsets) and a
sample of every tensor's bytes: the first and last 4 KiB of its data. Rewriting weights
in place changes the samples even when shapes stay the same; reading 8 KiB a tensor keeps
it fast for multi-GB checkpoints. Each shard is checked against its size first
(``checkpoint.read_shard_header``), so a damaged shard is refused, never fingerprinted.

A process asks for the same folder's fingerprint several times in one start (is the plan
cached? then the plan, the heal maps, the metrics). The samples are random reads, slow on
network storage, so the answer is kept per process while no file in it changed: any write
changes a file's ``st_ctime_ns``, which no tool can set back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_miprun.model.checkpoint import CONFIG_NAME, read_config, read_shard_header, safetensors_files

SAMPLE_BYTES = 4096
_KEPT = 8  # folders whose fingerprint this process keeps
_known: dict[tuple, str] = {}  # (folder, its files' stats) -> fingerprint


def model_fingerprint(model_dir: str | Path) -> str:
    key = _files_key(model_dir)
    if key is None:  # a file is missing: the read names it
        return _compute(model_dir)
    if key not in _known:
        _known[key] = _compute(model_dir)
        while len(_known) > _KEPT:
            del _known[next(iter(_known))]
    return _known[key]


def _files_key(model_dir: str | Path) -> tuple | None:
    """The folder and the size, times and inode of every file the fingerprint reads."""
    config = Path(model_dir) / CONFIG_NAME
    if not config.is_file():
        return None
    stats = []
    files = [config, *safetensors_files(model_dir)]
    for file in files:
        try:
            st = file.stat()
        except OSError:
            return None
        stats.append((file.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return (str(Path(model_dir).resolve()), tuple(stats))


def _compute(model_dir: str | Path) -> str:
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
