"""The miprun_* Prometheus metrics: pure computations, then a live server in each
Prometheus mode (one API server without PROMETHEUS_MULTIPROC_DIR, and with it)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_kit import engine_env
from vllm_miprun.core import gains
from vllm_miprun.core.gains import Baseline, ThroughputWindow
from vllm_miprun.core.latency import ideal_speedup, kv_bytes_per_token_per_block
from vllm_miprun.model import weights
from vllm_miprun.tools import harness
from vllm_miprun.vllm import metrics, reports

LLAMA = {"num_hidden_layers": 8, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


# --- pure computations (fast) ----------------------------------------------------------

def test_kv_bytes_per_token_standard_attention():
    # 2 (K and V) x 2 KV heads x head_dim 32 x 2 bytes
    assert kv_bytes_per_token_per_block(LLAMA, 2) == 256
    assert gains.kv_bytes_per_token_saved(LLAMA, num_pruned=3, dtype_bytes=4) == 3 * 512
    explicit = {**LLAMA, "head_dim": 64}
    assert kv_bytes_per_token_per_block(explicit, 2) == 2 * 2 * 64 * 2
    no_gqa = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    assert kv_bytes_per_token_per_block(no_gqa, 2) == 2 * 4 * 32 * 2


def test_kv_bytes_per_token_latent_attention_and_multimodal():
    mla = {"num_hidden_layers": 4, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 16}
    assert kv_bytes_per_token_per_block(mla, 2) == (512 + 64) * 2
    assert kv_bytes_per_token_per_block({"text_config": LLAMA, "vision_config": {}}, 2) == 256
    with pytest.raises(ValueError, match="dtype_bytes must be >= 1"):
        kv_bytes_per_token_per_block(LLAMA, 0)


def test_pruned_weight_bytes_from_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.layers.{i}.mlp.weight": torch.zeros(4, 8 + i) for i in range(3)}
    tensors["model.embed_tokens.weight"] = torch.zeros(10, 4)
    tensors["model.layers.1.input_layernorm.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    expected = 4 * 9 * 4 + 4 * 2 + 4 * 10 * 4  # blocks 1 and 2
    assert weights.pruned_weight_bytes([tmp_path / "model.safetensors"], [1, 2]) == expected
    assert weights.pruned_weight_bytes([tmp_path / "model.safetensors"], [2, 1, 2]) == expected  # each block once
    assert weights.pruned_weight_bytes([tmp_path / "model.safetensors"], []) == 0


@pytest.mark.parametrize("record, message", [
    ({"batch_size": 1}, "tokens_per_s must be a finite number > 0, got None"),
    ({"tokens_per_s": float("nan"), "batch_size": 1}, "finite number > 0"),
    ({"tokens_per_s": -3.0, "batch_size": 1}, "finite number > 0"),
    ({"tokens_per_s": 0, "batch_size": 1}, "finite number > 0, got 0"),
    ({"tokens_per_s": 10.0, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ([10.0], "must be a dict, got list"),
    ({"tokens_per_s": 10**400, "batch_size": 1}, "finite number > 0"),  # beyond float range
])
def test_bad_throughput_records_are_refused(record, message):
    with pytest.raises(ValueError, match=message):
        gains.validate_throughput(record)


def test_baseline_prefers_measured_then_profile_then_prediction():
    record = {"tokens_per_s": 200.0, "batch_size": 4, "measured_by": "bench"}
    profile = {"batch_size": 2, "fixed_s": 0.002, "block_s": [0.001] * 8}
    assert gains.choose_baseline(record, profile) == Baseline("measured", "benchmark", 200.0, 4)
    from_profile = gains.choose_baseline(None, profile)
    assert (from_profile.kind, from_profile.source) == ("estimated", "latency-profile")
    assert from_profile.tokens_per_s == pytest.approx(2 / 0.010)
    assert gains.choose_baseline({"tokens_per_s": 0}, None).source == "predicted-speedup"
    # a profile of zero seconds gives no rate (not a division by zero)
    assert gains.choose_baseline(None, {"batch_size": 1, "fixed_s": 0.0, "block_s": [0.0]}).source == "predicted-speedup"


def test_throughput_gain_measured_and_estimated():
    measured = Baseline("measured", "benchmark", 100.0, 1)
    assert gains.throughput_gain(130.0, measured, 1.2) == (100.0, pytest.approx(1.3))
    base, gain = gains.throughput_gain(0.0, measured, 1.2)
    assert base == 100.0 and math.isnan(gain)
    predicted = Baseline("estimated", "predicted-speedup", None)
    assert gains.throughput_gain(120.0, predicted, 1.2) == (pytest.approx(100.0), 1.2)
    assert all(math.isnan(x) for x in gains.throughput_gain(0.0, predicted, 1.2))


def test_window_counts_only_busy_decode_steps():
    window = ThroughputWindow(window_s=60)
    window.step(100.0, 4, running_before=False)  # prefill after idle: not counted
    for i in range(1, 11):
        window.step(100.0 + 0.1 * i, 4, running_before=True)  # 10 steps of 0.1 s, 4 tokens each
    window.step(200.0, 4, running_before=False)  # after a long idle spell: not counted
    assert window.rate(now=101.0) == pytest.approx(40 / 1.0)
    assert window.rate(now=101.05) == pytest.approx(40 / 1.0)  # still inside the 60 s window
    assert window.rate(now=161.5) == 0.0  # every counted step left the window
    with pytest.raises(ValueError, match="window_s must be > 0"):
        ThroughputWindow(0)


def test_window_ignores_steps_that_repeat_or_go_back_in_time():
    window = ThroughputWindow(window_s=60)
    for t in (10.0, 10.5, 11.0):
        window.step(t, 4, running_before=True)
    window.step(11.0, 4, running_before=True)  # the same timestamp: no busy time, no tokens
    window.step(10.8, 4, running_before=True)  # an earlier one
    assert window.rate(now=11.0) == pytest.approx(8 / 1.0)


def test_publish_writes_plan_and_load_reports(run_folder):
    tmp_path = run_folder
    reports.publish({"kept": [0, 1, 3], "num_blocks": 4, "predicted_speedup": 1.3, "scores_source": "computed"})
    reports.publish({"kept": [0, 1, 3], "num_blocks": 4, "load_seconds": 0.5, "kv_layouts": {"v": 1}})
    plan, seconds = reports.read_reports([0, 1, 3])
    assert plan["scores_source"] == "computed" and seconds == 0.5
    assert "planned_at" in json.loads((tmp_path / reports.PLAN_FILE).read_text())
    assert "loaded_at" in json.loads((tmp_path / f"{reports.LOAD_PREFIX}{os.getpid()}.json").read_text())
    assert reports.read_kv_layouts([0, 1, 3]) == {"v": 1}
    assert reports.read_reports([0, 1, 2]) == (None, None)  # another engine's reports


def test_a_report_that_cannot_be_written_is_named_in_one_warning(run_folder, monkeypatch):
    """Metrics never stop a load; the warning says which report was lost."""
    warned = []
    monkeypatch.setattr(reports.logger, "warning", lambda message, *args: warned.append(message % args))
    not_a_folder = run_folder / "file"
    not_a_folder.write_text("")
    reports.publish({"kept": [0], "num_blocks": 2}, folder=not_a_folder)
    reports.publish({"kept": [0], "num_blocks": 2, "load_seconds": 1.0}, folder=not_a_folder)
    assert [line.split(":")[1].strip() for line in warned] == ["could not publish the plan report",
                                                              "could not publish the load report"], warned


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A run folder for reports written by hand; this process has published none."""
    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(reports, "_published", {})
    return tmp_path


def _write(folder: Path, name: str, report: dict) -> None:
    (folder / name).write_text(json.dumps(report))


def test_load_seconds_are_the_slowest_workers_since_the_plan(run_folder):
    kept = [0, 1, 3]
    _write(run_folder, reports.PLAN_FILE, {"kept": kept, "planned_at": 100.0})
    _write(run_folder, "load-1.json", {"kept": kept, "load_seconds": 9.0, "loaded_at": 99.0})  # before the plan
    _write(run_folder, "load-2.json", {"kept": kept, "load_seconds": 2.0, "loaded_at": 101.0})
    _write(run_folder, "load-3.json", {"kept": kept, "load_seconds": 3.0, "loaded_at": 102.0})
    _write(run_folder, "load-4.json", {"kept": [0, 1, 2], "load_seconds": 7.0, "loaded_at": 103.0})  # another engine
    plan, seconds = reports.read_reports(kept)
    assert plan["planned_at"] == 100.0 and seconds == 3.0


def test_kv_layouts_come_from_the_newest_report_that_has_them(run_folder):
    kept = [0, 1, 3]
    _write(run_folder, reports.PLAN_FILE, {"kept": kept, "planned_at": 100.0})
    for name, loaded_at, layouts, of in [("load-1.json", 99.0, {"v": "stale"}, kept),  # before the plan
                                         ("load-2.json", 101.0, {"v": "old"}, kept),
                                         ("load-3.json", 104.0, None, kept),  # newest, but without layouts
                                         ("load-4.json", 105.0, {"v": "other"}, [0, 1, 2])]:
        _write(run_folder, name, {"kept": of, "load_seconds": 1.0, "loaded_at": loaded_at, "kv_layouts": layouts})
    reports._published["load"] = {"kept": kept, "load_seconds": 1.0, "loaded_at": 103.0, "kv_layouts": {"v": "new"}}
    assert reports.read_kv_layouts(kept) == {"v": "new"}


def test_a_run_folder_that_is_gone_is_not_used(tmp_path, monkeypatch):
    """A stale MIPRUN_RUN_DIR (its run ended): a new folder is made, not writes that fail."""
    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path / "gone"))
    monkeypatch.setattr(reports, "_created_run_dirs", [])
    assert reports.run_dir() is None
    made = reports.run_dir(create=True)
    try:
        assert made.is_dir() and made != tmp_path / "gone"
    finally:
        shutil.rmtree(made)


def test_a_killed_front_process_leaves_a_folder_the_next_run_removes(tmp_path):
    """SIGKILL skips the exit hook; the next front process of this user on this node removes
    the folder, and only folders whose owner has surely ended (a reused process id too)."""
    from vllm_miprun.vllm import process_owner

    make_and_die = ("import os, signal; from vllm_miprun.vllm import reports; "
                    "print(reports.run_dir(create=True), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop(reports.RUN_DIR_ENV, None)
    done = subprocess.run([sys.executable, "-c", make_and_die], env=env, capture_output=True, text=True, timeout=60)
    orphan = Path(done.stdout.strip())
    assert done.returncode == -9 and orphan.parent == tmp_path and (orphan / reports.OWNER_FILE).is_file()
    me = process_owner.owner_record()
    owners = {"live": me,  # this process
              "reused-pid": {**me, "start": "0"},  # this process's id, but another process had it
              "other-node": {**me, "pid": json.loads((orphan / reports.OWNER_FILE).read_text())["pid"],
                             "node": "another-host|boot|pid:[1]"},  # a dead id, in another namespace
              "unowned": None}
    for name, owner in owners.items():
        (tmp_path / f"{reports.RUN_DIR_PREFIX}{name}").mkdir()
        if owner is not None:
            _write(tmp_path / f"{reports.RUN_DIR_PREFIX}{name}", reports.OWNER_FILE, owner)
    removed = reports.remove_orphaned_run_dirs(tmp_path)
    assert sorted(removed) == sorted([orphan, tmp_path / f"{reports.RUN_DIR_PREFIX}reused-pid"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{reports.RUN_DIR_PREFIX}{name}"
                                                         for name in ("live", "other-node", "unowned")]


def test_folders_planted_in_tmp_neither_stop_nor_hang_a_start(tmp_path, monkeypatch):
    """A shared /tmp may hold anything under our prefix: a FIFO or a link to /dev/zero as the
    owner file, a process id no kernel has, a plain file, a link to another folder. Each is
    left alone, quickly."""
    from vllm_miprun.vllm import process_owner

    planted = {"fifo": None, "zero": None, "huge-pid": {"pid": 10**20, "start": "1", "node": "x"}}
    for name, owner in planted.items():
        folder = tmp_path / f"{reports.RUN_DIR_PREFIX}{name}"
        folder.mkdir()
        if owner is not None:
            _write(folder, reports.OWNER_FILE, owner)
    os.mkfifo(tmp_path / f"{reports.RUN_DIR_PREFIX}fifo" / reports.OWNER_FILE)
    os.symlink("/dev/zero", tmp_path / f"{reports.RUN_DIR_PREFIX}zero" / reports.OWNER_FILE)
    (tmp_path / f"{reports.RUN_DIR_PREFIX}file").write_text("{}")
    elsewhere = tmp_path / "elsewhere"  # a folder of someone else's, whose owner has ended
    elsewhere.mkdir()
    _write(elsewhere, reports.OWNER_FILE, {**process_owner.owner_record(), "start": "0"})
    os.symlink(elsewhere, tmp_path / f"{reports.RUN_DIR_PREFIX}link")
    started = time.monotonic()
    assert reports.remove_orphaned_run_dirs(tmp_path) == []
    assert time.monotonic() - started < 5 and len(list(tmp_path.iterdir())) == 6
    assert (elsewhere / reports.OWNER_FILE).is_file()
    monkeypatch.setattr(reports.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(reports.RUN_DIR_ENV, raising=False)
    monkeypatch.setattr(reports, "_created_run_dirs", [])
    monkeypatch.setattr(reports, "owner_gone", lambda owner: 1 / 0)  # whatever the sweep meets
    made = reports.run_dir(create=True)
    try:
        assert made.parent == tmp_path and (made / reports.OWNER_FILE).is_file()
    finally:
        shutil.rmtree(made)


def test_every_metric_has_help_text():
    assert all(len(help_text) > 20 for help_text, _ in metrics.METRICS.values())


# --- a live server in each Prometheus mode (slow) --------------------------------------

SERVE = "import sys; from vllm_miprun.vllm.serve import serve_main; sys.exit(serve_main(sys.argv[1:]))"
KEEP = 0.75
KV_BYTES = 16 * 2**20
MEASURED_TOKENS_PER_S = 1000.0


def _write_measured_baseline(model_dir: Path, cache_dir: Path, num_blocks: int) -> None:
    """A score cache for these weights that holds the benchmark's throughput record."""
    from vllm_miprun.pipeline import store as sc
    from vllm_miprun.model.fingerprint import model_fingerprint

    size = num_blocks + 1
    span = [[float(j - i) if i < j else None for j in range(size)] for i in range(size)]
    fingerprint = model_fingerprint(model_dir)
    record = sc.ScoreCache(
        fingerprint=fingerprint, model={"name": model_dir.name, "num_blocks": num_blocks},
        calibration={"dataset": "test"}, estimator={"name": "gaussian"},
        block_scores=[1.0] * num_blocks, span_scores=span,
        baselines={"block_influence": [0.1] * num_blocks, "angular": span, "skip_mi_iso": span}, timings={},
        throughput={"tokens_per_s": MEASURED_TOKENS_PER_S, "batch_size": 1, "device": "cpu",
                    "measured_by": "tests/test_metrics.py"},
    )
    sc.write_cache(sc.cache_path(model_dir, fingerprint, record.calibration, cache_dir), record)


def _stored_bytes_of_blocks(model_dir: Path, blocks: list[int]) -> int:
    """Independent of the code under test: parse the safetensors header by hand."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            parts = name.split(".")
            if name.startswith("model.layers.") and int(parts[2]) in blocks:
                total += info["data_offsets"][1] - info["data_offsets"][0]
    return total


@pytest.fixture(scope="module", params=["single-process", "multiprocess"])
def scraped(request, tiny_llama_dir, tmp_path_factory):
    """Start `vllm-miprun serve`, send completions, scrape /metrics; stop the server."""
    import requests
    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    mode = request.param
    work = tmp_path_factory.mktemp(f"metrics-{mode}")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict({"keep": KEEP, "method": "last"}), hf_config=config)
    env = engine_env(without=["PROMETHEUS_MULTIPROC_DIR", reports.RUN_DIR_ENV], MIPRUN_CACHE_DIR=str(work / "scores"))
    if mode == "multiprocess":
        (work / "prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(work / "prom")
        _write_measured_baseline(tiny_llama_dir, work / "scores", plan.num_blocks)
    port = harness.free_port()
    log = work / "server.log"
    started = time.monotonic()
    with open(log, "w") as log_file:
        proc = harness.start_in_own_group(
            [sys.executable, "-c", SERVE, str(tiny_llama_dir), "--port", str(port), "--host", "127.0.0.1",
             "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
             "--kv-cache-memory-bytes", str(KV_BYTES),
             "--miprun-keep", str(KEEP), "--miprun-method", "last"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        harness.wait_healthy(proc, port, 300, lambda: log.read_text()[-4000:])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for prompt in ("Once upon a time", "The capital of France is", "In 1905, the physicist"):
            answer = client.completions.create(model=str(tiny_llama_dir), prompt=prompt, max_tokens=24,
                                               temperature=0.0, extra_body={"ignore_eos": True})
            assert answer.usage.completion_tokens == 24
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        (work / "metrics.txt").write_text(text)  # for a failing test's reader
    finally:
        harness.stop_group(proc, grace=60)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {"mode": mode, "families": families, "plan": plan, "config": config, "model_dir": tiny_llama_dir,
            "seconds": time.monotonic() - started, "log": log}


def _value(scraped, name: str, **labels: str) -> float:
    family = scraped["families"].get(name)
    assert family is not None, f"{name} missing in {scraped['mode']} mode; server log {scraped['log']}"
    samples = [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(samples) == 1, (name, family.samples)
    assert samples[0].labels["model_name"] == str(scraped["model_dir"])
    return samples[0].value


@pytest.mark.engine
def test_every_miprun_metric_is_served_with_help(scraped):
    for name, (help_text, _) in metrics.METRICS.items():
        family = scraped["families"].get(name)
        assert family is not None, f"{name} missing in {scraped['mode']} mode"
        assert family.type == "gauge" and family.documentation == help_text


@pytest.mark.engine
def test_vllm_metrics_share_the_endpoint(scraped):
    names = set(scraped["families"])
    assert "vllm:generation_tokens" in names and "vllm:num_requests_running" in names


@pytest.mark.engine
def test_plan_metrics_match_the_plan(scraped):
    plan = scraped["plan"]
    total, kept = plan.num_blocks, len(plan.kept)
    assert (total, kept) == (8, 6)
    assert _value(scraped, "miprun_blocks_total") == total
    assert _value(scraped, "miprun_blocks_kept") == kept
    assert _value(scraped, "miprun_keep_ratio") == pytest.approx(kept / total)
    # one layer type and a fixed KV size: the engine's pruned blocks over the blocks the same
    # memory holds for all L layers (whole blocks, so not exactly L/K)
    info = scraped["families"]["vllm:cache_config_info"].samples[0].labels
    per_layer_block = int(info["block_size"]) * 2 * scraped["config"]["num_key_value_heads"] * \
        scraped["config"]["hidden_size"] // scraped["config"]["num_attention_heads"] * 4
    full_blocks = KV_BYTES // (total * per_layer_block)
    assert _value(scraped, "miprun_kv_capacity_ratio") == pytest.approx(int(info["num_gpu_blocks"]) / full_blocks)
    assert _value(scraped, "miprun_predicted_speedup", latency_source=plan.latency_source) == \
        pytest.approx(plan.predicted_speedup)
    # no profile was measured: the gauge is the one speed model's estimate, the benchmarks' "estimate"
    assert plan.latency_source == "flop-byte-estimate"
    assert plan.predicted_speedup == pytest.approx(ideal_speedup(scraped["config"], kept)["estimate"])
    assert _value(scraped, "miprun_scores_source", source="none-needed", method="last") == 1
    assert _value(scraped, "miprun_plan_seconds") >= 0


@pytest.mark.engine
def test_memory_metrics_match_headers_and_config(scraped):
    plan, config = scraped["plan"], scraped["config"]
    assert _value(scraped, "miprun_weight_bytes_saved") == \
        _stored_bytes_of_blocks(scraped["model_dir"], list(plan.pruned)) > 0
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    float32 = 4  # served with --dtype float32 and the default KV cache dtype
    per_block = 2 * config["num_key_value_heads"] * head_dim * float32
    assert _value(scraped, "miprun_kv_cache_bytes_per_token_saved") == per_block * len(plan.pruned)


@pytest.mark.engine
def test_load_seconds_come_from_the_worker(scraped):
    assert 0 < _value(scraped, "miprun_load_seconds") < scraped["seconds"]
    # the worker's load line names what it built, and what it left out, in the plan's numbering
    plan = scraped["plan"]
    built = re.search(r"miprun: built (\d+) of (\d+) blocks, kept (\[[\d, ]*\]), pruned (\[[\d, ]*\])",
                      scraped["log"].read_text())
    assert built, f"no load line in {scraped['log']}"
    assert (int(built[1]), int(built[2])) == (len(plan.kept), plan.num_blocks)
    assert (json.loads(built[3]), json.loads(built[4])) == (list(plan.kept), list(plan.pruned))


@pytest.mark.engine
def test_throughput_gain_after_requests(scraped):
    rate = _value(scraped, "miprun_generation_tokens_per_second")
    assert rate > 0
    if scraped["mode"] == "multiprocess":  # a throughput record in the score cache
        base = _value(scraped, "miprun_throughput_baseline_tokens_per_second", baseline="measured",
                      source="benchmark")
        assert base == MEASURED_TOKENS_PER_S
        assert _value(scraped, "miprun_throughput_gain", baseline="measured") == pytest.approx(rate / base)
    else:  # no record: the gain is the predicted speed-up, flagged as an estimate
        gain = _value(scraped, "miprun_throughput_gain", baseline="estimated")
        assert gain == pytest.approx(scraped["plan"].predicted_speedup)
        base = _value(scraped, "miprun_throughput_baseline_tokens_per_second", baseline="estimated",
                      source="predicted-speedup")
        assert base == pytest.approx(rate / gain)


# --- the exporter's gauges, without an engine -------------------------------------------


def _sample(name: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_exporter_gauges_count_the_pruned_blocks(tiny_llama_dir, tmp_path, monkeypatch):
    """K of L kept: the figures follow from the config and the headers, and the KV capacity
    falls back to L/K when the worker reported no KV layouts."""
    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    total, kept = int(config["num_hidden_layers"]), [0, 1, 2, 3, 4, 5]
    metrics.Exporter("gauges-test", tiny_llama_dir, config, kept, total, 2, cache_dir=str(tmp_path)).publish_static()
    name = {"model_name": "gauges-test"}
    assert _sample("miprun_blocks_total", **name) == total == 8
    assert _sample("miprun_blocks_kept", **name) == len(kept)
    assert _sample("miprun_keep_ratio", **name) == pytest.approx(len(kept) / total)
    assert _sample("miprun_kv_capacity_ratio", **name) == pytest.approx(total / len(kept))
    per_block = 2 * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"]) * 2
    assert _sample("miprun_kv_cache_bytes_per_token_saved", **name) == (total - len(kept)) * per_block
    assert _sample("miprun_weight_bytes_saved", **name) == _stored_bytes_of_blocks(tiny_llama_dir, [6, 7]) > 0


def test_exporter_rate_averages_engines_counts_busy_steps_and_updates_when_idle(tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    exporter = metrics.Exporter("rate-test", tiny_llama_dir, config, [0, 1, 2, 3], 8, 2, cache_dir=str(tmp_path))
    exporter.publish_static()
    rate = lambda: _sample("miprun_generation_tokens_per_second", model_name="rate-test")  # noqa: E731
    t = time.time() + 100
    exporter.step(0, t, 5, 1)  # prefill after idle: not counted
    exporter.step(0, t + 1, 10, 1)  # 10 tokens in 1 busy second; the gauge follows (not throttled)
    assert rate() == pytest.approx(10.0)
    exporter.step(0, t + 1.25, 5, 0)  # the last busy step: shown at once, though within the throttle
    assert rate() == pytest.approx(15 / 1.25)
    exporter.step(0, t + 50, 7, 1)  # after an idle spell: neither its tokens nor the gap count
    exporter.step(1, t + 51, 4, 1)  # a second engine: 40 tokens in 1 busy second
    exporter.step(1, t + 52, 40, 1)
    exporter.refresh(t + 52, force=True)
    assert rate() == pytest.approx((15 / 1.25 + 40.0) / 2)  # per engine, comparable to one full model


def test_kv_engine_counts_blocks_of_one_engine():
    from types import SimpleNamespace as NS

    def engine(**parallel):
        base = {"data_parallel_external_lb": False, "data_parallel_hybrid_lb": False, "data_parallel_size": 4,
                "data_parallel_size_local": 2, "tensor_parallel_size": 2}
        config = NS(parallel_config=NS(**{**base, **parallel}),
                    cache_config=NS(num_gpu_blocks=800, kv_cache_memory_bytes=None))
        return metrics._kv_engine(config)

    assert engine() == {"blocks": 200, "fixed_memory": None, "tp": 2}  # vLLM sums the 4 engines
    assert engine(data_parallel_hybrid_lb=True)["blocks"] == 400  # the 2 local engines
    assert engine(data_parallel_external_lb=True)["blocks"] == 800  # this server talks to one engine


def test_kv_capacity_ratio_counts_the_pruned_weights_freed_on_one_rank(tiny_llama_dir, tmp_path, monkeypatch):
    """Without a fixed KV size the full model's pool is smaller by the pruned weights, and with
    tensor parallelism each rank holds only its share of them."""
    monkeypatch.setenv(reports.RUN_DIR_ENV, str(tmp_path))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    kept = [0, 2, 3, 4, 5, 6]  # blocks 1 and 7 pruned
    saved = _stored_bytes_of_blocks(tiny_llama_dir, [1, 7])
    block = saved // 10
    layouts = {"pruned": {"bytes_per_block": block, "blocks_per_request": 4},
               "full": {"bytes_per_block": 2 * block, "blocks_per_request": 8}}
    reports.publish({"kept": kept, "num_blocks": 8, "load_seconds": 0.1, "kv_layouts": layouts})

    def ratio(tp: int) -> float:
        engine = {"blocks": 100, "fixed_memory": None, "tp": tp}
        return metrics.Exporter(f"kv-tp{tp}", tiny_llama_dir, config, kept, 8, 2, kv_engine=engine).kv_capacity_ratio()

    # the full model's pool: 100.5 blocks' memory less the freed bytes, in blocks twice the size
    assert ratio(1) == pytest.approx((100 / 4) / (((100.5 * block - saved) // (2 * block)) / 8))
    assert ratio(2) == pytest.approx((100 / 4) / (((100.5 * block - saved // 2) // (2 * block)) / 8))
    assert ratio(2) < ratio(1)


def _write_aged_caches(model_dir: Path, folder: Path, **records: dict) -> dict[str, Path]:
    """One score cache of ``model_dir``'s weights per ``dataset=fields`` (listed newest
    first, each 1,000 s older than the one before); their paths by dataset."""
    from vllm_miprun.model.fingerprint import model_fingerprint
    from vllm_miprun.pipeline import store as sc

    fingerprint, num_blocks = model_fingerprint(model_dir), 8
    span = [[float(j - i) if i < j else None for j in range(num_blocks + 1)] for i in range(num_blocks + 1)]
    paths = {}
    for age, (dataset, fields) in enumerate(records.items()):
        record = sc.ScoreCache(
            fingerprint=fingerprint, model={"name": model_dir.name, "num_blocks": num_blocks},
            calibration={"dataset": dataset}, estimator={"name": "gaussian"},
            block_scores=[1.0] * num_blocks, span_scores=span,
            baselines={"block_influence": [0.1] * num_blocks, "angular": span, "skip_mi_iso": span}, timings={},
            **fields)
        paths[dataset] = sc.cache_path(model_dir, fingerprint, record.calibration, folder)
        sc.write_cache(paths[dataset], record)
        os.utime(paths[dataset], (time.time() - 1000 * (age + 1),) * 2)
    return paths


def _throughput(rate: float) -> dict:
    return {"tokens_per_s": rate, "batch_size": 1, "device": "cpu", "measured_by": "test"}


def test_cached_baseline_is_read_from_the_newest_score_cache(tiny_llama_dir, tmp_path):
    """Several score caches of these weights: the benchmark record of the newest one is the baseline."""
    _write_aged_caches(tiny_llama_dir, tmp_path, newer={"throughput": _throughput(2000.0)},
                       older={"throughput": _throughput(1000.0)})
    baseline = metrics.find_cached_baseline(tiny_llama_dir, None, tmp_path)
    assert (baseline.kind, baseline.source, baseline.tokens_per_s) == ("measured", "benchmark", 2000.0)


def test_cached_baseline_prefers_the_plans_cache_then_the_newest_profile_then_any_measurement(
        tiny_llama_dir, tmp_path):
    """Only latency profiles cached: the newest one's full-model rate, unless the plan names
    its own cache; a measured benchmark record in any cache beats every profile."""
    from vllm_miprun.core.profile_fit import make_profile

    fast, slow = make_profile(8, 1, [(8, 0.010), (4, 0.006)]), make_profile(8, 1, [(8, 0.040), (4, 0.024)])
    paths = _write_aged_caches(tiny_llama_dir, tmp_path, newer={"profile": fast}, older={"profile": slow})

    def rate(plan=None) -> tuple:
        baseline = metrics.find_cached_baseline(tiny_llama_dir, plan, tmp_path)
        return baseline.kind, baseline.source, baseline.tokens_per_s

    fast_rate, slow_rate = rate()[2], rate({"cache_path": str(paths["older"])})[2]
    assert rate() == ("estimated", "latency-profile", pytest.approx(1 / 0.010, rel=0.05))
    assert slow_rate == pytest.approx(fast_rate / 4)  # the plan's own (older) cache, not the newest
    _write_aged_caches(tiny_llama_dir, tmp_path / "measured", newer={"profile": fast},
                       oldest={"throughput": _throughput(123.0)})
    assert metrics.find_cached_baseline(tiny_llama_dir, None, tmp_path / "measured").tokens_per_s == 123.0
