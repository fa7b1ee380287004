"""The evaluation backend that scores requests with the model as vLLM serves it.

``vllm.LLM`` (with ``load_format="miprun"`` when pruning) reads the prompt tokens'
log-probabilities (``prompt_logprobs=0``). vLLM starts its workers with spawn: a script
that calls it needs an ``if __name__ == "__main__":`` guard, or the engine fails to start.
``tools/evaluate.py`` picks this backend for ``--backend vllm``.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_miprun.model.checkpoint import read_config
from vllm_miprun.tools.eval_tasks import Request, fit_request


class VllmBackend:
    """The model as vLLM serves it; log-probabilities from ``prompt_logprobs``.

    Callers must run under ``if __name__ == "__main__":`` (vLLM spawns its workers).
    """

    def __init__(self, model_dir: str | Path, options: Mapping[str, Any] | None = None, dtype: str = "float32",
                 max_model_len: int | None = None, kv_cache_memory_bytes: int | None = 1 << 30,
                 seed: int = 0, **llm_kwargs: Any):
        from vllm import LLM

        config = read_config(model_dir)
        limit = config.get("max_position_embeddings") or 2048
        self.max_length = min(max_model_len or 2048, limit)
        self.num_blocks = int(config["num_hidden_layers"])
        kwargs = dict(model=str(model_dir), load_format="miprun" if options else "auto",
                      model_loader_extra_config=dict(options or {}), enforce_eager=True, dtype=dtype,
                      max_model_len=self.max_length, seed=seed)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.vllm_config.model_config.hf_config
        kept = getattr(hf_config, "miprun_kept_layers", None)
        self.kept = list(kept) if kept is not None else None

    def loglikelihood(self, requests: list[Request], progress: bool = False) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        fitted = [fit_request(r, self.max_length) for r in requests]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in fitted]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        results = []
        for (ctx, cont), out in zip(fitted, outputs):
            seq = ctx + cont
            # prompt_logprobs[t] is None for t = 0, else {token: Logprob} incl. the prompt token seq[t]
            results.append(sum(out.prompt_logprobs[t][seq[t]].logprob for t in range(len(ctx), len(seq))))
        return results

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """``max_tokens`` greedily decoded tokens per prompt; end-of-text does not stop them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def close(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
