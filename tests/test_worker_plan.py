"""Planning in the worker (an engine config not made by EngineArgs): the quantization config
vLLM built is renumbered like the front process's, and ranks that planned alone agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_quantization import QCONFIGS, write_quantized_checkpoint
from vllm_miprun.vllm.ranks import disagreement


def _unplanned_engine_config(model_dir, extra):
    """The engine config as a caller that bypasses the plugin's EngineArgs hook builds it."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), load_format="miprun", model_loader_extra_config=extra,
                      dtype="bfloat16", enforce_eager=True, max_model_len=256)
    return EngineArgs.create_engine_config.__wrapped__(args)


def test_worker_plan_renumbers_the_quantization_config_vllm_built(tiny_llama_dir, tmp_path):
    from vllm.model_executor.model_loader import get_model_loader

    qcfg = dict(QCONFIGS["gptq"], dynamic={r"-:model\.layers\.7\..*": {}})  # block 7 stays float
    model = tmp_path / "gptq"
    write_quantized_checkpoint(tiny_llama_dir, model, "gptq", qcfg, float_blocks=(7,))
    vllm_config = _unplanned_engine_config(model, {"keep": 0.5, "method": "last"})
    assert list(vllm_config.quant_config.dynamic) == [r"-:model\.layers\.7\..*"]  # full-model numbering
    loader = get_model_loader(vllm_config.load_config)
    loader._ensure_pruned_config(vllm_config.model_config, vllm_config)
    assert list(vllm_config.model_config.hf_config.miprun_kept_layers) == [0, 1, 2, 7]
    # block 7 is block 3 of the pruned model, and it is the float one
    assert list(vllm_config.quant_config.dynamic) == [r"-:model\.layers\.3\..*"]


def test_a_single_process_has_no_ranks_to_compare():
    """No process group (one process, vLLM's uniprocess executor): nothing is gathered."""
    import torch.distributed as dist

    from vllm_miprun.vllm.ranks import check_ranks_agree

    assert not dist.is_initialized()
    assert check_ranks_agree([0, 1, 3], "0123456789ab") is None


def test_disagreeing_plans_are_named():
    assert disagreement([([0, 1, 3], None), ([0, 1, 3], None)]) is None
    problem = disagreement([([0, 1, 3], None), ([0, 1, 3], None), ([0, 2, 3], None)])
    assert "rank 0 kept [0, 1, 3]; rank 2 kept [0, 2, 3]" in problem and "rank 1" not in problem
    problem = disagreement([([0, 1, 3], "0123456789ab"), ([0, 1, 3], "fedcba987654")])
    assert "rank 0 kept [0, 1, 3], plan digest 0123456789ab; rank 1 kept [0, 1, 3], plan digest fedcba987654" \
        in problem


RANK_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch.distributed as dist
    from vllm_miprun.vllm.ranks import RankPlanError, check_ranks_agree

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2)
    try:
        check_ranks_agree(json.loads(sys.argv[2])[rank])
        print("AGREE")
    except RankPlanError as error:
        print("REFUSED " + str(error))
    dist.barrier()  # both ranks have answered before either leaves
    # torch's gloo teardown aborts now and then ("terminate called without an active
    # exception", exit -6; 2 of 60 runs of this script here):
    # the check is done, so leave without it
    sys.stdout.flush()
    os._exit(0)
''')


@pytest.mark.parametrize("plans, word", [([[0, 1, 3], [0, 1, 3]], "AGREE"), ([[0, 1, 3], [0, 2, 3]], "REFUSED")])
def test_two_ranks_compare_their_plans(plans, word, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    ranks = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "rendezvous"), json.dumps(plans)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank)}) for rank in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    assert all(out.startswith(word) for out, _ in outputs), outputs
    if word == "REFUSED":
        assert all("rank 1 kept [0, 2, 3]" in out for out, _ in outputs)


WORKER_PLAN_ENGINE = textwrap.dedent('''
    import json, sys
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    if __name__ == "__main__":
        args = EngineArgs(model=sys.argv[1], load_format="miprun", model_loader_extra_config=json.loads(sys.argv[2]),
                          tensor_parallel_size=2, enforce_eager=True, dtype="float32", max_model_len=256,
                          kv_cache_memory_bytes=16 * 2**20, seed=0)
        engine = LLMEngine.from_vllm_config(EngineArgs.create_engine_config.__wrapped__(args))  # no front plan
        engine.add_request("0", "Once upon a time", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        tokens = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.outputs[0].token_ids)
        print("RESULT " + json.dumps({"tokens": tokens}))
''')


@pytest.mark.engine
def test_tensor_parallel_workers_that_plan_alone_calibrate_once_and_serve(tiny_llama_dir, tmp_path):
    from engine_kit import engine_env
    from vllm_miprun.tools import harness

    script = tmp_path / "engine.py"
    script.write_text(WORKER_PLAN_ENGINE)
    extra = {"keep": 0.75, "method": "shortgpt", "device": "cpu", "cache_dir": str(tmp_path / "scores"),
             "samples": 4, "seq_len": 32}
    env = engine_env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    code, out, err = harness.run_in_own_group([sys.executable, str(script), str(tiny_llama_dir), json.dumps(extra)],
                                              600, env)
    assert code == 0, err[-4000:]
    logs = out + err  # vLLM's logger writes to stdout
    assert logs.count("planning in the worker") == 2, logs[-4000:]  # each rank planned, and they agreed
    assert len(list((tmp_path / "scores").glob("*.json"))) == 1
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert len(result["tokens"]) == 4


def test_worker_plan_patches_the_text_config_of_a_multimodal_model_too():
    """A multimodal config nests the language model's config (hf_text_config): the kept blocks
    must reach it too, or vLLM builds every block of the text model."""
    from types import SimpleNamespace

    from vllm_miprun.vllm.loader import _apply_overrides_in_place

    text = SimpleNamespace(num_hidden_layers=8)
    outer = SimpleNamespace(text_config=text)
    model_config = SimpleNamespace(hf_config=outer, hf_text_config=text, get_model_arch_config=lambda: "rebuilt")
    _apply_overrides_in_place(model_config, {"num_hidden_layers": 4, "miprun_kept_layers": [0, 1, 2, 7]})
    assert text.num_hidden_layers == outer.num_hidden_layers == 4
    assert text.miprun_kept_layers == outer.miprun_kept_layers == [0, 1, 2, 7]
    assert model_config.model_arch_config == "rebuilt"
    same = SimpleNamespace(num_hidden_layers=8)
    plain = SimpleNamespace(hf_config=same, hf_text_config=same, get_model_arch_config=lambda: "rebuilt")
    _apply_overrides_in_place(plain, {"num_hidden_layers": 4})
    assert same.num_hidden_layers == 4
