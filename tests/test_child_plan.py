"""Issue 14: planning that may initialise CUDA runs in a child process, so the
front (API-server) process leaves the GPU as it found it."""

from __future__ import annotations

import os
import re

import pytest
import torch

from vllm_miprun.options import MiprunOptions
from vllm_miprun.errors import OptionError
from vllm_miprun.pipeline.child import ChildPlanError, heal_needs_child, needs_child, plan_in_child, rank_device
from vllm_miprun.pipeline.plan import make_plan

CALIBRATION = {"samples": 4, "seq_len": 32}


def test_only_cuda_planning_that_reads_the_model_needs_a_child():
    assert needs_child(MiprunOptions(keep=0.5, device="cuda"))
    assert needs_child(MiprunOptions(keep=0.5, device="cuda", method="shortgpt"))
    assert not needs_child(MiprunOptions(keep=0.5, device="cuda", method="last"))
    assert not needs_child(MiprunOptions(keep=0.5, device="cpu"))
    assert needs_child(MiprunOptions(keep=0.5, device="cuda:1"))
    assert not needs_child(MiprunOptions(drop="1-2", device="cuda"))  # named blocks: nothing is read
    # a quality budget's validation passes read the model, whatever the method
    assert needs_child(MiprunOptions(quality_budget=1.3, method="last", device="cuda"))
    # auto stands for cuda exactly when torch sees a GPU
    assert needs_child(MiprunOptions(keep=0.5, device="auto")) == torch.cuda.is_available()


def test_the_switch_forces_the_child_on_or_off(monkeypatch):
    monkeypatch.setenv("MIPRUN_PLAN_CHILD", "always")
    assert needs_child(MiprunOptions(keep=0.5, device="cpu"))
    assert heal_needs_child(MiprunOptions(keep=0.5, heal="linear", device="cpu"))
    assert not heal_needs_child(MiprunOptions(keep=0.5, device="cpu"))  # no heal: no fit to run anywhere
    monkeypatch.setenv("MIPRUN_PLAN_CHILD", "never")
    assert not needs_child(MiprunOptions(keep=0.5, device="cuda"))
    monkeypatch.setenv("MIPRUN_PLAN_CHILD", "sometimes")
    with pytest.raises(OptionError, match="MIPRUN_PLAN_CHILD must be one of auto, always, never"):
        needs_child(MiprunOptions(keep=0.5, device="cuda"))


def _as_if_calibrated_on_cuda(model_dir, options: MiprunOptions) -> None:
    """Write the CPU-made cache where a CUDA plan reads (this machine has no GPU): the same
    scores under the compute a CUDA plan looks for, so only the lookup is tested."""
    import dataclasses

    from vllm_miprun.pipeline import store
    from vllm_miprun.pipeline.calibrate import calibration_key
    from vllm_miprun.pipeline.plan import scores_location

    cpu_path, _, _ = scores_location(model_dir, MiprunOptions.from_dict({**options_raw(options), "device": "cpu"}))
    cuda_path, _, compute = scores_location(model_dir, options)
    assert compute == "cuda-float32" and cuda_path != cpu_path
    cache = store.read_cache(cpu_path)
    store.write_cache(cuda_path, dataclasses.replace(cache, calibration=calibration_key(options.calibration, compute)))


def test_a_score_cache_hit_for_a_score_only_method_plans_without_a_child(tiny_llama_dir, tmp_path):
    options = MiprunOptions.from_dict({"keep": 0.75, "method": "shortgpt", "device": "cuda",
                                       "cache_dir": str(tmp_path), **CALIBRATION})
    assert needs_child(options, tiny_llama_dir)  # no cache yet: planning calibrates on CUDA
    make_plan(tiny_llama_dir, MiprunOptions.from_dict({**options_raw(options), "device": "cpu"}), progress=False)
    # a CPU cache is not what a CUDA plan reads (make_plan would calibrate on CUDA, here)
    assert needs_child(options, tiny_llama_dir)
    _as_if_calibrated_on_cuda(tiny_llama_dir, options)
    assert not needs_child(options, tiny_llama_dir)  # the scores are read, nothing runs on CUDA
    assert make_plan(tiny_llama_dir, options, progress=False).scores_source == "cache-hit"  # no GPU here: none used
    # a forward search is answered by the cache only for a count it has stored
    forward = MiprunOptions.from_dict({**options_raw(options), "method": "mi-prun"})
    assert needs_child(forward, tiny_llama_dir)
    make_plan(tiny_llama_dir, MiprunOptions.from_dict({**options_raw(forward), "device": "cpu"}), progress=False)
    assert needs_child(forward, tiny_llama_dir)
    _as_if_calibrated_on_cuda(tiny_llama_dir, forward)
    assert not needs_child(forward, tiny_llama_dir)
    assert make_plan(tiny_llama_dir, forward, progress=False).scores_source == "cache-hit"


def test_a_stored_answer_covers_neither_protect_nor_a_quality_budget(tiny_llama_dir, tmp_path):
    """The stored mi-prun answer for keep 0.75 has no protected blocks, and a quality budget's
    validation passes are in no stored answer: both plan on CUDA, so in a child."""
    options = MiprunOptions.from_dict({"keep": 0.75, "method": "mi-prun", "device": "cuda",
                                       "cache_dir": str(tmp_path), **CALIBRATION})
    make_plan(tiny_llama_dir, MiprunOptions.from_dict({**options_raw(options), "device": "cpu"}), progress=False)
    _as_if_calibrated_on_cuda(tiny_llama_dir, options)
    assert not needs_child(options, tiny_llama_dir)
    assert needs_child(MiprunOptions.from_dict({**options_raw(options), "protect": "0"}), tiny_llama_dir)
    budget = {key: value for key, value in options_raw(options).items() if key != "keep"}
    for method in ("shortgpt", "mi-prun"):  # the scores are cached; the validation passes are not
        assert needs_child(MiprunOptions.from_dict({**budget, "method": method, "quality_budget": 1.3}),
                           tiny_llama_dir)


def options_raw(options: MiprunOptions) -> dict:
    from vllm_miprun.pipeline.child import options_to_raw

    return options_to_raw(options)


def test_each_torchrun_rank_plans_on_its_own_gpu():
    assert rank_device("cuda", "1", 4) == "cuda:1"
    assert rank_device("cuda", "1", 1) == "cuda"  # one visible GPU per rank: its own is the default
    assert rank_device("cuda", None, 4) == "cuda"
    assert rank_device("cuda:2", "1", 4) == "cuda:2"  # an explicit index wins
    assert rank_device("cpu", "1", 4) == "cpu"


def test_the_childs_errors_come_back_as_their_own_class(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MIPRUN_PLAN_CHILD", "always")
    options = MiprunOptions.from_dict({"keep": 0.75, "protect": "0,99", "cache_dir": str(tmp_path), **CALIBRATION})
    with pytest.raises(OptionError, match="99") as raised:
        plan_in_child(tiny_llama_dir, options)
    assert type(raised.value) is OptionError


def test_a_plan_made_in_the_child_is_the_plan_made_here(tiny_llama_dir, tmp_path):
    options = MiprunOptions.from_dict({"keep": 0.75, "method": "shortgpt", "cache_dir": str(tmp_path / "child"),
                                       **CALIBRATION})
    child = plan_in_child(tiny_llama_dir, options)
    assert list((tmp_path / "child").glob("*.json")), "the child calibrated and wrote the score cache"
    here = make_plan(tiny_llama_dir, MiprunOptions.from_dict(
        {"keep": 0.75, "method": "shortgpt", "cache_dir": str(tmp_path / "here"), **CALIBRATION}), progress=False)
    assert child.kept == here.kept and child.scores_source == "computed"


def test_the_child_plans_with_the_callers_config(tiny_llama_dir, tmp_path):
    """hf_overrides reach the child: it plans 6 blocks, not the checkpoint's 8."""
    import json

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    options = MiprunOptions.from_dict({"keep": 0.5, "method": "last", "cache_dir": str(tmp_path)})
    plan = plan_in_child(tiny_llama_dir, options, {**config, "num_hidden_layers": 6})
    assert (plan.num_blocks, plan.kept) == (6, (0, 1, 5))


def test_cuda_planning_under_vllm_runs_in_a_child_and_leaves_cuda_alone(tiny_llama_dir, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_miprun.vllm.engine_args import prepare_engine_args

    engine_args = EngineArgs(
        model=str(tiny_llama_dir), load_format="miprun",
        model_loader_extra_config={"keep": 0.75, "device": "cuda", "cache_dir": str(tmp_path), **CALIBRATION},
    )
    if torch.cuda.is_available():
        prepare_engine_args(engine_args)
        assert engine_args.hf_overrides  # planned, in the child
    else:
        # No GPU here: the child finds none and says so; the error names the child's pid.
        with pytest.raises(ChildPlanError, match="planning child process") as raised:
            prepare_engine_args(engine_args)
        child_pid = int(re.search(r"pid (\d+)", str(raised.value)).group(1))
        assert child_pid != os.getpid()
    assert not torch.cuda.is_initialized()


def test_heal_maps_for_cuda_are_fitted_in_a_child(tiny_llama_dir, tmp_path):
    from vllm_miprun.vllm.engine_args import heal_outside_cuda

    options = MiprunOptions.from_dict({"keep": 0.75, "heal": "linear", "device": "cuda",
                                       "cache_dir": str(tmp_path), **CALIBRATION})
    kept = [0, 1, 2, 4, 5, 7]  # runs of pruned blocks start after blocks 2 and 5
    if torch.cuda.is_available():
        heal_outside_cuda(tiny_llama_dir, options, kept, 8)
        assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    else:
        with pytest.raises(ChildPlanError, match="planning child process") as raised:
            heal_outside_cuda(tiny_llama_dir, options, kept, 8)
        assert int(re.search(r"pid (\d+)", str(raised.value)).group(1)) != os.getpid()
    assert not torch.cuda.is_initialized()


def test_stored_heal_maps_are_read_without_a_child(tiny_llama_dir, tmp_path):
    from dataclasses import replace

    from vllm_miprun.pipeline.heal import prepare_maps

    options = MiprunOptions.from_dict({"keep": 0.75, "heal": "linear", "device": "cuda",
                                       "cache_dir": str(tmp_path), **CALIBRATION})
    kept = [0, 1, 2, 4, 5, 7]
    assert heal_needs_child(options, tiny_llama_dir, kept, 8)  # nothing stored: the fit runs on CUDA
    prepare_maps(tiny_llama_dir, replace(options, device="cpu"), kept, 8, progress=False)
    assert not heal_needs_child(options, tiny_llama_dir, kept, 8)  # stored: read here, no CUDA
    assert not heal_needs_child(options, tiny_llama_dir, list(range(8)), 8)  # nothing to heal
