"""Integrity under interruption and concurrency: never a partial or corrupt score cache."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from vllm_miprun.pipeline.store import read_cache


def _calibrate_cmd(model_dir, cache_dir, samples: int = 4) -> list[str]:
    return [sys.executable, "-m", "vllm_miprun.tools.cli", "calibrate", str(model_dir), "--samples", str(samples),
            "--seq-len", "32", "--cache-dir", str(cache_dir)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_calibration_leaves_no_cache(tiny_llama_dir, tmp_path, signum):
    cache_dir = tmp_path / "scores"
    # Enough samples that the block pass is still running when the signal lands.
    proc = subprocess.Popen(_calibrate_cmd(tiny_llama_dir, cache_dir, samples=2048),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (cache_dir.exists() and proc.poll() is None):
        time.sleep(0.2)  # the cache folder appears once the expensive pass starts
    time.sleep(1.0)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
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
