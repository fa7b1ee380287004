"""Integrity under interruption and concurrency: never a partial or corrupt score cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from vllm_miprun.pipeline.store import read_cache
from vllm_miprun.tools import harness


def _calibrate_cmd(model_dir, cache_dir, samples: int = 4) -> list[str]:
    return [sys.executable, "-m", "vllm_miprun.tools.cli", "calibrate", str(model_dir), "--samples", str(samples),
            "--seq-len", "32", "--cache-dir", str(cache_dir)]


def _start_and_await(cmd: list[str], marker: bytes, timeout: float = 120):
    """Start ``cmd``; return it with its stderr so far once ``marker`` shows there (a
    thread keeps reading, so ``proc.wait`` then ``"".join(err)`` has the rest)."""
    # the harness's start: the child handles SIGINT even when the tests run in the background
    proc = harness.start_in_own_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    err: list[bytes] = []
    seen = threading.Event()

    def pump() -> None:  # tqdm ends its updates with \r, not \n: read raw chunks
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):
            err.append(chunk)
            if marker in b"".join(err[-2:]):
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert seen.wait(timeout), b"".join(err).decode(errors="replace")[-3000:]
    return proc, reader, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_calibration_leaves_no_cache(tiny_llama_dir, tmp_path, signum):
    cache_dir = tmp_path / "scores"
    # The signal lands once the block pass has started (its progress bar is on stderr); with
    # this many samples the pass still has seconds to go, even on a busy machine.
    proc, reader, chunks = _start_and_await(_calibrate_cmd(tiny_llama_dir, cache_dir, samples=4096),
                                            b"calibrating blocks")
    assert proc.poll() is None, b"".join(chunks).decode(errors="replace")[-3000:]
    proc.send_signal(signum)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_calibrations_both_finish_with_a_valid_cache(tiny_llama_dir, tmp_path):
    cache_dir = tmp_path / "scores"
    procs = [subprocess.Popen(_calibrate_cmd(tiny_llama_dir, cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    caches = [p for p in cache_dir.iterdir() if p.suffix == ".json"]
    assert len(caches) == 1
    cache = read_cache(caches[0])
    assert cache.num_blocks == 8
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
