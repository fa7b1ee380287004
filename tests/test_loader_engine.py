"""The miprun loader inside real vLLM engines on CPU (slow: each engine start ~20-60 s).

Engines run in subprocesses (``engine_runner.py`` through ``engine_kit``), several per process where a test
only compares outputs, to keep the number of Python + vLLM imports small. Method
"last" is used throughout: the scores are not the point here, the loader is.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine_kit import engine_env, run_engines
from references import greedy, pruned_hf, token_ids
from vllm_miprun.options import MiprunOptions
from vllm_miprun.tools import harness

pytestmark = pytest.mark.engine

KV_BYTES = 16 * 2**20  # fixed KV memory, so capacity depends only on the built layers
KEEP_HALF = {"keep": 0.5, "method": "last"}
KEPT_HALF = [0, 1, 2, 7]  # "last" at keep 0.5 of 8 blocks: drop the 4 before the final one


def _plan_kept(model_dir: Path, extra: dict) -> list[int]:
    from vllm_miprun.pipeline.plan import make_plan

    config = json.loads((model_dir / "config.json").read_text())
    return list(make_plan(model_dir, MiprunOptions.from_dict(extra), hf_config=config).kept)


def _strip_pruned_blocks(model_dir: Path, out_dir: Path, kept: list[int]) -> Path:
    """A copy of the checkpoint whose pruned blocks' tensors are gone from the file."""
    from vllm_miprun.model.remap import layer_index

    shutil.copytree(model_dir, out_dir)
    tensors = load_file(model_dir / "model.safetensors")
    kept_tensors = {n: t for n, t in tensors.items() if layer_index(n) is None or layer_index(n) in kept}
    assert len(kept_tensors) < len(tensors)
    save_file(kept_tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def llama_runs(tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir, tiny_mistral_dir, tmp_path_factory):
    """One process, eight engines, one after another: every single-worker comparison."""
    from vllm_miprun.tools.export import export_pruned
    from vllm_miprun.pipeline.plan import make_plan

    work = tmp_path_factory.mktemp("engine")
    kept = _plan_kept(tiny_llama_dir, KEEP_HALF)
    assert kept == KEPT_HALF
    stripped = _strip_pruned_blocks(tiny_llama_dir, work / "stripped", kept)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    plan = make_plan(tiny_llama_dir, MiprunOptions.from_dict(KEEP_HALF), hf_config=config)
    exported = export_pruned(tiny_llama_dir, work / "exported", plan)
    miprun = {"load_format": "miprun", "kv_bytes": KV_BYTES}
    specs = {
        "stock": {"model": str(tiny_llama_dir), "kv_bytes": KV_BYTES},
        "keep1": {"model": str(tiny_llama_dir), "extra": {"keep": 1.0, "method": "last"}, **miprun},
        "half": {"model": str(tiny_llama_dir), "extra": KEEP_HALF, **miprun},
        # The same blocks named with the drop option: no selection, same plan, same tokens.
        "stripped": {"model": str(stripped), "extra": {"drop": "3-6"}, **miprun},
        "exported": {"model": str(exported), "kv_bytes": KV_BYTES},
        "qwen2": {"model": str(tiny_qwen2_dir), "extra": KEEP_HALF, **miprun},
        "qwen3": {"model": str(tiny_qwen3_dir), "extra": KEEP_HALF, **miprun},
        "mistral": {"model": str(tiny_mistral_dir), "extra": KEEP_HALF, **miprun},
    }
    # In-process engine cores: no engine/worker spawns, ~15 s per engine instead of ~60 s.
    results = run_engines(list(specs.values()), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return dict(zip(specs, results))


def test_keep_one_matches_stock_loader(llama_runs):
    assert llama_runs["keep1"]["kept"] == list(range(8))
    assert llama_runs["keep1"]["tokens"] == llama_runs["stock"]["tokens"]


def test_pruned_model_builds_only_kept_blocks(llama_runs):
    assert llama_runs["half"]["num_hidden_layers"] == 4
    assert llama_runs["half"]["kept"] == KEPT_HALF
    assert llama_runs["half"]["tokens"] != llama_runs["keep1"]["tokens"]


def test_kv_capacity_grows_by_exactly_l_over_k(llama_runs):
    full, half = llama_runs["keep1"]["kv_tokens"], llama_runs["half"]["kv_tokens"]
    assert full > 0
    assert half == full * 8 // 4


def test_checkpoint_without_pruned_tensors_loads_with_same_plan(llama_runs):
    """Planned with drop 3-6 (the blocks "last" prunes at keep 0.5) on a checkpoint without them."""
    assert llama_runs["stripped"]["kept"] == llama_runs["half"]["kept"] == KEPT_HALF
    assert llama_runs["stripped"]["tokens"] == llama_runs["half"]["tokens"]


def test_exported_checkpoint_served_by_stock_vllm_matches(llama_runs):
    assert llama_runs["exported"]["num_hidden_layers"] == 4
    assert llama_runs["exported"]["tokens"] == llama_runs["half"]["tokens"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_load_pruned(llama_runs, arch):
    run = llama_runs[arch]
    assert run["num_hidden_layers"] == 4 and run["kept"] == KEPT_HALF
    assert all(len(tokens) == 16 for tokens in run["tokens"])


def test_tensor_parallel_two_matches_one(tiny_llama_dir, llama_runs):
    spec = {"model": str(tiny_llama_dir), "load_format": "miprun", "extra": KEEP_HALF,
            "kv_bytes": KV_BYTES, "tp": 2}
    (tp2,) = run_engines([spec], VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert tp2["kept"] == KEPT_HALF
    assert tp2["tokens"] == llama_runs["half"]["tokens"]


# --- the command line -------------------------------------------------------------

SERVE = "import sys; from vllm_miprun.vllm.serve import serve_main; sys.exit(serve_main(sys.argv[1:]))"


def _start_server(model_dir: Path, *flags: str, port: int) -> subprocess.Popen:
    return harness.start_in_own_group(
        [sys.executable, "-c", SERVE, str(model_dir), "--port", str(port), "--host", "127.0.0.1",
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
         "--kv-cache-memory-bytes", str(KV_BYTES), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=engine_env(),
    )




def test_miprun_serve_with_keep_flag_answers_openai_client(tiny_llama_dir):
    from openai import OpenAI

    port = harness.free_port()
    proc = _start_server(tiny_llama_dir, "--miprun-keep", "0.5", "--miprun-method", "last", port=port)
    try:
        harness.wait_healthy(proc, port, 300, lambda: proc.stderr.read()[-4000:])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == [str(tiny_llama_dir)]
        answer = client.completions.create(model=str(tiny_llama_dir), prompt="Once upon a time",
                                           max_tokens=8, temperature=0.0)
        assert answer.choices[0].text and answer.usage.completion_tokens == 8
    finally:
        harness.stop_group(proc, grace=60)
        proc.stderr.close()


def _run_cli_expecting_failure(model_dir: Path, *flags: str) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = harness.start_in_own_group(
        [sys.executable, "-c", SERVE, str(model_dir), "--enforce-eager", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=engine_env(),
    )
    try:
        out, err = proc.communicate(timeout=180)
        left = harness.session_pids(proc.pid)
    finally:
        harness.signal_group(proc.pid, signal.SIGKILL)
    assert left == [], f"processes left behind: {left}"
    return proc.returncode, out + err, time.monotonic() - start


@pytest.fixture(scope="module")
def unsupported_field_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsupported") / "model"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["no_rope_layers"] = [1, 0] * 4
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_bad_keep_exits_before_loading(tiny_llama_dir):
    """One real process for the argparse path; test_cli_options covers the other values."""
    code, output, _ = _run_cli_expecting_failure(tiny_llama_dir, "--miprun-keep", "1.5")
    assert code == 2 and "keep must be a number in (0, 1], got '1.5'" in output
    assert "Traceback" not in output and "EngineCore" not in output


def test_unsupported_architecture_field_exits_before_loading(unsupported_field_dir):
    code, output, _ = _run_cli_expecting_failure(unsupported_field_dir, "--miprun-keep", "0.5",
                                                 "--miprun-method", "last")
    assert code == 1 and "no_rope_layers" in output
    assert "Traceback" not in output and "EngineCore" not in output


# --- SmolLM2: agreement with transformers --------------------------------------------

SMOLLM2_PROMPTS = [
    "The capital of France is", "Water boils at a temperature of", "The largest planet in our solar system is",
    "Once upon a time, there was a", "The quick brown fox", "In mathematics, a prime number is",
    "The first president of the United States was", "Photosynthesis is the process by which",
    "My favourite food is", "The theory of relativity was developed by",
]


@pytest.mark.smollm2
def test_smollm2_keep_075_agrees_with_transformers(smollm2_dir):
    model_dir = smollm2_dir
    extra = {"keep": 0.75, "method": "last"}
    kept = _plan_kept(model_dir, extra)
    spec = {"model": str(model_dir), "load_format": "miprun", "extra": extra,
            "prompts": SMOLLM2_PROMPTS, "kv_bytes": 64 * 2**20}
    (vllm_run,) = run_engines([spec], VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert vllm_run["kept"] == kept
    hf_tokens, hf_logprobs = greedy(pruned_hf(model_dir, kept), token_ids(model_dir, SMOLLM2_PROMPTS), 16,
                                    use_cache=True)
    agree = sum(a == b for a, b in zip(vllm_run["tokens"], hf_tokens))
    assert agree >= 9, (vllm_run["tokens"], hf_tokens)
    first_steps = [(v[0], h[0]) for v, h in zip(vllm_run["logprobs"], hf_logprobs)]
    assert all(abs(v - h) < 0.05 for v, h in first_steps), first_steps
