"""SIGKILL inside the write window: the previous file stays readable, the next start removes the debris.

The writer is a real ``vllm-miprun calibrate --force`` of the tiny model. The test hook
``MIPRUN_TEST_WRITE_PAUSE`` makes ``store.atomic_write_bytes`` name its written, fsynced
temporary file and wait before the rename; the test kills it right there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_miprun.pipeline import store as sc


def _calibrate(model_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm_miprun.tools.cli", "calibrate", str(model_dir), "--samples", "4",
            "--seq-len", "32", "--cache-dir", str(cache_dir), *extra]


def _paused_writer(model_dir: Path, cache_dir: Path, marker: Path) -> tuple[subprocess.Popen, Path]:
    """A recalibration stopped inside its write window; (process, its temp file)."""
    return _paused(_calibrate(model_dir, cache_dir, "--force"), marker)


def _paused(command: list[str], marker: Path) -> tuple[subprocess.Popen, Path]:
    """``command`` stopped inside its first write window; (process, its temp file)."""
    env = {**os.environ, "MIPRUN_TEST_WRITE_PAUSE": str(marker)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (marker.exists() and marker.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the writer never reached its write window"
        time.sleep(0.05)
    return proc, Path(marker.read_text())


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


@pytest.fixture(scope="module")
def first_calibration(tiny_llama_dir, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("first") / "scores"
    done = subprocess.run(_calibrate(tiny_llama_dir, cache_dir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return cache_dir


@pytest.fixture
def calibrated(first_calibration, tmp_path) -> tuple[Path, Path, bytes]:
    """(cache folder, the score cache, its bytes) after one clean calibration (a copy per test)."""
    cache_dir = tmp_path / "scores"
    shutil.copytree(first_calibration, cache_dir)
    (cache,) = cache_dir.glob("*.json")
    return cache_dir, cache, cache.read_bytes()


def test_sigkill_inside_the_write_window_keeps_the_old_cache_and_the_next_start_sweeps(
        tiny_llama_dir, tmp_path, calibrated):
    cache_dir, cache, before = calibrated
    proc, temp = _paused_writer(tiny_llama_dir, cache_dir, tmp_path / "marker")
    assert temp.parent == cache_dir and temp.name.startswith(f".{cache.name}.") and temp.name.endswith(".tmp")
    sc.read_cache(temp)  # the new file was complete and fsynced: only the rename was missing
    _kill(proc)

    assert cache.read_bytes() == before
    sc.read_cache(cache)
    assert temp.exists()  # the debris a kill leaves

    time.sleep(sc.STALE_TEMP_SECONDS)
    again = subprocess.run(_calibrate(tiny_llama_dir, cache_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not temp.exists()
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == [cache.name]
    assert cache.read_bytes() == before  # reused, not rewritten


def test_the_sweep_spares_live_writers_and_other_files(tiny_llama_dir, tmp_path, calibrated):
    cache_dir, cache, _ = calibrated
    others = [cache_dir / ".notes.tmp", cache_dir / f".{cache.name}.tmp", cache_dir / "keep.json.12345678.tmp"]
    for path in others:
        path.write_text("not ours")
    proc, temp = _paused_writer(tiny_llama_dir, cache_dir, tmp_path / "marker")
    old = time.time() - 3600
    for path in [temp, *others]:
        os.utime(path, (old, old))
    try:
        assert sc.sweep_stale_temps(cache_dir) == []  # the live writer holds its temp's lock
        assert temp.exists()
    finally:
        _kill(proc)
    assert sc.sweep_stale_temps(cache_dir) == [temp]
    assert all(path.exists() for path in others)


def test_a_stability_table_killed_while_written_leaves_the_previous_one_whole(tiny_llama_dir, tmp_path):
    """``vllm-miprun stability --json-out`` writes its table as the score cache is written."""
    import json

    out = tmp_path / "stability.json"
    out.write_text('{"previous": true}\n')
    command = [sys.executable, "-m", "vllm_miprun.tools.cli", "stability", str(tiny_llama_dir), "--seeds", "2",
               "--methods", "last", "--cache-dir", str(tmp_path / "scores"), "--json-out", str(out)]
    proc, temp = _paused(command, tmp_path / "marker")
    assert temp.parent == tmp_path and json.loads(temp.read_text())["methods"]["last"]["pruned_sets"] == [[5, 6]] * 2
    _kill(proc)
    assert out.read_text() == '{"previous": true}\n'

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["seeds"] == 2 and table["methods"]["last"]["mean_pairwise_jaccard"] == 1.0
