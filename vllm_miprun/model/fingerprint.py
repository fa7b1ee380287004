"""A model fingerprint that identifies the weights, not the path.

It hashes config.json, every safetensors header (names, dtypes, shapes, offsets) and a
sample of every tensor's bytes: the first and last 4 KiB of its data. Rewriting weights
in place changes the samples even when shapes stay the same; reading 8 KiB a tensor keeps
it fast for multi-GB checkpoints. Each shard is checked against its size first
(``checkpoint.read_shard_header``), so a damaged shard is refused, never fingerprinted.

A process asks for the same folder's fingerprint several times in one start (is the plan
cached? then the plan, the heal maps, the metrics). The samples are random reads, slow on
network storage, so the answer is kept per process while no file in it changed, by size,
times, inode and device. Files are stat-ed through ``open`` (which revalidates NFS's cached
attributes) and a folder with a file changed in the last two seconds is not kept: a
timestamp tick may hide a second write (git's "racy clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

from vllm_miprun.model.checkpoint import CONFIG_NAME, read_config, read_shard_header, safetensors_files

SAMPLE_BYTES = 4096
_KEPT = 8  # folders whose fingerprint this process keeps
RACY_NS = 2_000_000_000  # a file changed this recently may change again within its timestamp tick
_known: dict[tuple, str] = {}  # (folder, its files' stats) -> fingerprint
_lock = threading.Lock()


def model_fingerprint(model_dir: str | Path) -> str:
    key = _files_key(model_dir)
    with _lock:
        if key in _known:
            return _known[key]
    started = time.time_ns()
    fingerprint = _compute(model_dir)
    if key is not None and all(started - ctime > RACY_NS for *_, ctime, _, _ in key[1]):
        with _lock:
            _known[key] = fingerprint
            while len(_known) > _KEPT:
                del _known[next(iter(_known))]
    return fingerprint


def _files_key(model_dir: str | Path) -> tuple | None:
    """The folder and the size, times, inode and device of every file the fingerprint
    reads; None when one is missing (the read names it)."""
    config = Path(model_dir) / CONFIG_NAME
    if not config.is_file():
        return None
    stats = []
    for file in [config, *safetensors_files(model_dir)]:
        try:
            if not stat.S_ISREG(file.stat().st_mode):  # a FIFO would block the open: the read refuses it
                return None
            with open(file, "rb") as handle:
                st = os.fstat(handle.fileno())
        except OSError:
            return None
        stats.append((file.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
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
