"""Workers that do not share the front process's environment: Ray actors, other nodes.

A Ray actor has its node's environment, not the front process's, and another node may
hold only the kept blocks' shards. The unit tests check the two pieces (folders carried
in the config; heal maps read on a partial snapshot); the engine test serves a healed
model with vLLM's Ray executor, tensor parallel 2 on CPU, on a local loopback cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from engine_kit import engine_env, run_engines
from vllm_miprun.model import checkpoint
from vllm_miprun.options import CalibrationSettings, MiprunOptions
from vllm_miprun.pipeline import heal, store
from vllm_miprun.tools import harness

TESTS = Path(__file__).parent
RAY_CPU = TESTS / "ray_cpu"  # the test-only platform plugin that lets vLLM's CPU platform use Ray
KEEP_HALF = {"keep": 0.5, "method": "last"}
KEPT_HALF = [0, 1, 2, 7]  # "last" at keep 0.5 of 8 blocks
HEAL = {**KEEP_HALF, "heal": "linear", "samples": 4, "seq_len": 32}


def _no_fit(*_args, **_kwargs):
    raise AssertionError("the stored heal maps must be read, not fitted again")


# --- the folders travel in the config ------------------------------------------------------


def test_workers_take_the_folders_from_the_config_not_their_environment(tiny_llama_dir, tmp_path, monkeypatch):
    from vllm.config.load import LoadConfig
    from vllm.engine.arg_utils import EngineArgs

    from vllm_miprun.model.remap import KEPT_FIELD
    from vllm_miprun.vllm import engine_args as hooks
    from vllm_miprun.vllm import loader, reports

    front, elsewhere = tmp_path / "front", tmp_path / "elsewhere"
    front.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv(reports.RUN_DIR_ENV, "")  # none yet; restored after the test
    monkeypatch.chdir(front)
    monkeypatch.setenv("MIPRUN_CACHE_DIR", "scores")  # relative: a Ray actor's working folder differs
    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun", model_loader_extra_config=dict(KEEP_HALF))
    hooks.prepare_engine_args(args)
    extra = args.model_loader_extra_config
    run_dir = Path(os.environ[reports.RUN_DIR_ENV])
    assert list(args.hf_overrides[KEPT_FIELD]) == KEPT_HALF

    # a worker on a node of its own: other values, other working folder, no run folder named
    monkeypatch.setenv("MIPRUN_CACHE_DIR", str(tmp_path / "node-scores"))
    monkeypatch.setenv("MIPRUN_HOME", str(tmp_path / "node-home"))
    monkeypatch.delenv(reports.RUN_DIR_ENV)
    monkeypatch.chdir(elsewhere)
    worker = loader.MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config=extra))
    assert store.cache_folder(worker.options.cache_dir) == front / "scores"
    loader.record_report({"kept": KEPT_HALF, "num_blocks": 8, "load_seconds": 0.25}, worker.run_dir)
    report = json.loads((run_dir / f"{reports.LOAD_PREFIX}{os.getpid()}.json").read_text())
    assert report["load_seconds"] == 0.25 and report["kept"] == KEPT_HALF


def test_a_carried_run_folder_this_node_lacks_is_not_used(tmp_path):
    """A worker on another node keeps its load report in-process, with no warning per load."""
    from vllm_miprun.options import RUN_DIR_KEY
    from vllm_miprun.vllm import worker_paths

    assert worker_paths.carried_run_dir({RUN_DIR_KEY: str(tmp_path)}) == tmp_path
    assert worker_paths.carried_run_dir({RUN_DIR_KEY: str(tmp_path / "elsewhere")}) is None
    (tmp_path / "a-file").write_text("")
    assert worker_paths.carried_run_dir({RUN_DIR_KEY: str(tmp_path / "a-file")}) is None  # a folder only
    assert worker_paths.carried_run_dir(None) is None


def test_carried_keys_are_not_user_options():
    assert MiprunOptions.from_dict({**KEEP_HALF, "run_dir": "/somewhere"}).keep == 0.5
    with pytest.raises(Exception, match="unknown miprun option"):
        MiprunOptions.from_dict({**KEEP_HALF, "run_folder": "/somewhere"})


# --- heal maps on a node that fetched only the kept blocks' shards --------------------------


def _hub_snapshot(root: Path, tiny_model_dir: Path) -> Path:
    from fake_hub import write_sharded_repo

    folder = root / "models--org--tiny" / "snapshots" / ("c0ffee" * 7)[:40]
    write_sharded_repo(tiny_model_dir, folder, blocks_per_shard=1)
    return folder


def test_heal_maps_load_on_a_node_that_fetched_only_the_kept_shards(tiny_llama_dir, tmp_path, monkeypatch):
    from vllm_miprun.vllm.model_files import shard_split

    kept = [1, 2, 5, 6]
    full, partial = _hub_snapshot(tmp_path / "front", tiny_llama_dir), _hub_snapshot(tmp_path / "node", tiny_llama_dir)
    _, never_fetched = shard_split(partial, kept)
    assert never_fetched
    for name in never_fetched:
        (partial / name).unlink()
    options = MiprunOptions(heal="linear", calibration=CalibrationSettings(samples=4, seq_len=32), drop=(0, 3, 4, 7),
                            cache_dir=str(tmp_path / "scores"))
    fitted = heal.prepare_maps(full, options, kept, 8, progress=False)  # the front process, every shard
    assert sorted(fitted) == [0, 3, 7]

    monkeypatch.setattr(heal, "fit_maps", _no_fit)
    worker = dataclasses.replace(options, require_cache=True)
    read = heal.prepare_maps(partial, worker, kept, 8, progress=False)
    assert sorted(read) == sorted(fitted) and all(torch.equal(read[s], fitted[s]) for s in fitted)
    with pytest.raises(heal.HealError, match="lacks the shards .* no hub alias"):
        heal.prepare_maps(partial, dataclasses.replace(worker, cache_dir=str(tmp_path / "other")), kept, 8)


# --- vLLM's Ray executor, tensor parallel 2, on CPU (slow) ---------------------------------

SERVE = "import sys; from vllm_miprun.vllm.serve import serve_main; sys.exit(serve_main(sys.argv[1:]))"
KV_BYTES = 16 * 2**20
MAX_TOKENS = 12
LOGPROB_TOLERANCE = 1e-4  # same float32 model, same TP split; only the all-reduce code differs
# Ray binds the loopback address only with this; otherwise it swaps in the machine's own address.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "VLLM_HOST_IP": "127.0.0.1"}


def _env(**values: str) -> dict[str, str]:
    """This environment without miprun's variables, with ``values``; the test platform importable."""
    return engine_env(scrub_miprun=True, path_first=[RAY_CPU],
                      **{**LOOPBACK_RAY, "VLLM_CPU_OMP_THREADS_BIND": "0|1", **values})


def _start_ray(work: Path, node_env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """A 2-worker Ray cluster on 127.0.0.1 with ``node_env``: (process, address, temp folder)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    address_file = work / "ray-address"
    with open(work / "ray.log", "w") as log:
        proc = harness.start_in_own_group([sys.executable, str(TESTS / "ray_head.py"), temp, "2", str(address_file)],
                                          env=_env(**node_env), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not address_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            harness.kill_group(proc)
            pytest.fail(f"Ray did not start: {(work / 'ray.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, address_file.read_text(), temp


def _leftovers(temp: str) -> list[int]:
    """Processes of this user whose command line names the cluster's temp folder."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found


def _complete(port: int, model: str) -> tuple[list[list[int]], list[list[float]]]:
    from engine_runner import DEFAULT_PROMPTS
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    tokens, logprobs = [], []
    for prompt in DEFAULT_PROMPTS:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                           logprobs=1, extra_body={"ignore_eos": True,
                                                                   "return_tokens_as_token_ids": True})
        steps = answer.choices[0].logprobs
        tokens.append([int(token.split(":")[1]) for token in steps.tokens])
        logprobs.append(list(steps.token_logprobs))
    return tokens, logprobs


def _gauges(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = harness.http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)[1]
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("miprun_")}


@pytest.mark.engine
def test_ray_tensor_parallel_serves_the_healed_model_like_mp(tiny_llama_dir, tmp_path):
    """``vllm serve --distributed-executor-backend ray -tp 2`` with heal maps under a custom
    ``MIPRUN_CACHE_DIR`` and ``require_cache``: the Ray workers find the maps (no fit), answer
    as the ``mp`` workers do, and their load reports reach ``/metrics``. The Ray node was
    started with its own ``MIPRUN_*`` values, which the workers keep."""
    from vllm_miprun.pipeline.plan import make_plan

    scores, decoy = tmp_path / "scores", tmp_path / "node"
    options = MiprunOptions.from_dict({**HEAL, "cache_dir": str(scores)})
    plan = make_plan(tiny_llama_dir, options, hf_config=checkpoint.read_config(tiny_llama_dir))
    assert list(plan.kept) == KEPT_HALF
    heal.prepare_maps(tiny_llama_dir, options, KEPT_HALF, 8, progress=False)  # fitted once, beforehand
    stored = sorted(scores.glob("*-heal-*.safetensors"))
    assert len(stored) == 1
    extra = {**HEAL, "require_cache": True}  # the cache folder comes from MIPRUN_CACHE_DIR only

    (mp,) = run_engines([{"model": str(tiny_llama_dir), "load_format": "miprun", "extra": extra, "tp": 2,
                          "backend": "mp", "kv_bytes": KV_BYTES, "max_tokens": MAX_TOKENS}],
                        VLLM_CPU_OMP_THREADS_BIND="0|1", MIPRUN_CACHE_DIR=str(scores))
    assert mp["kept"] == KEPT_HALF

    node_env = {"MIPRUN_HOME": str(decoy), "MIPRUN_CACHE_DIR": str(decoy / "scores"),
                "MIPRUN_RUN_DIR": str(decoy / "run")}
    (decoy / "run").mkdir(parents=True)
    ray_proc, address, temp = _start_ray(tmp_path, node_env)
    server, log = None, tmp_path / "server.log"
    try:
        port = harness.free_port()
        flags = [f"--miprun-{key.replace('_', '-')}={value}" for key, value in HEAL.items()]
        with open(log, "w") as log_file:
            server = harness.start_in_own_group(
                [sys.executable, "-c", SERVE, str(tiny_llama_dir), "--port", str(port), "--host", "127.0.0.1",
                 "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
                 "--kv-cache-memory-bytes", str(KV_BYTES), "--seed", "0",
                 "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2",
                 *flags, "--miprun-require-cache"],
                stdout=log_file, stderr=subprocess.STDOUT,
                env=_env(RAY_ADDRESS=address, MIPRUN_CACHE_DIR=str(scores), MIPRUN_HOME=str(tmp_path / "home")))
        started = harness.wait_healthy(server, port, 600, lambda: log.read_text()[-6000:])
        tokens, logprobs = _complete(port, str(tiny_llama_dir))
        gauges = _gauges(port)
    finally:
        left = harness.stop_group(server, grace=60) if server is not None else []
        left += harness.stop_group(ray_proc, grace=60)
        orphans = _leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)
    print(f"ray tp=2 server healthy after {started:.1f} s")
    assert left == [] and orphans == [], f"processes left behind: {left} {orphans}"
    assert "RayWorkerProc" in log.read_text()  # the workers were Ray actors
    assert tokens == mp["tokens"]
    for ray_steps, mp_steps in zip(logprobs, mp["logprobs"]):
        assert ray_steps == pytest.approx(mp_steps, abs=LOGPROB_TOLERANCE)
    assert gauges["miprun_blocks_kept"] == len(KEPT_HALF)
    assert gauges.get("miprun_load_seconds", 0) > 0, f"no worker load report reached /metrics: {sorted(gauges)}"
    assert sorted(scores.glob("*-heal-*.safetensors")) == stored  # nothing fitted or written anew
    assert not list(decoy.rglob("*.json")) and not list(decoy.rglob("*.safetensors"))
