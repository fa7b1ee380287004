"""Shared fixtures: tiny seeded models, built once per test session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Every engine a test starts (and its TP workers, Ray actors, message queues) binds to loopback:
# without this vLLM picks the machine's own private address, and tests send traffic only to 127.0.0.1.
os.environ["VLLM_HOST_IP"] = "127.0.0.1"
# vLLM binds its ZMQ ipc sockets in VLLM_RPC_BASE_PATH (default: /tmp) and leaves their files behind,
# 7 per server start even after a clean shutdown (stock vLLM 0.32): the tests' engines bind in
# one folder of their own, removed when the session ends, instead of filling /tmp run after run.
_RPC_DIR = tempfile.mkdtemp(prefix="miprun-tests-rpc-")
os.environ.setdefault("VLLM_RPC_BASE_PATH", _RPC_DIR)

from tiny_models import make_tiny_model  # noqa: E402

from vllm_miprun.errors import ModelFolderError  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402


def _tiny(tmp_path_factory, arch: str, **kwargs) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **kwargs)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(arch, num_layers, **shape)``: a family's tiny model, built once per session
    for each shape asked (tests that change a checkpoint copy it first)."""
    built: dict[tuple, Path] = {}

    def build(arch: str, num_layers: int = 4, **shape) -> Path:
        key = (arch, num_layers, *sorted(shape.items()))
        if key not in built:
            built[key] = make_tiny_model(tmp_path_factory.mktemp(f"family-{arch}"), arch=arch,
                                         num_layers=num_layers, **shape)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M (the harness's default model); fails when it is missing."""
    try:
        return harness.default_model_dir()
    except ModelFolderError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="session")
def serve_parser():
    """``vllm serve``'s argument parser with the plugin registered (twice: registration is
    re-entrant, so the flags are added once), wherever this vLLM release keeps it."""
    import vllm_miprun
    from vllm_miprun.vllm import compat

    vllm_miprun.register()
    vllm_miprun.register()
    return compat.serve_parser()


def pytest_unconfigure(config):
    shutil.rmtree(_RPC_DIR, ignore_errors=True)
