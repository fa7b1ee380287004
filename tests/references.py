"""The transformers reference that engine tests compare vLLM with: the model with the same
blocks deleted (``delete_blocks``, the eval backend's path), decoded greedily step by step.

float32 on CPU unless a test says otherwise; each step's log-prob is the chosen token's
entry of ``log_softmax`` over the last position's logits (in float32).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_hf(model_dir: Path, dtype: str = "float32", patch: dict | None = None):
    """transformers' model for ``model_dir`` with its family's attention implementation, in eval
    mode, its config updated with ``patch``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_miprun.model.architectures import for_config

    family = for_config(json.loads((Path(model_dir) / "config.json").read_text()))
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in (patch or {}).items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=getattr(torch, dtype),
                                                attn_implementation=family.attn_implementation).eval()


def pruned_hf(model_dir: Path, kept: list[int], dtype: str = "float32", patch: dict | None = None,
              heal_maps: dict | None = None):
    """``load_hf`` with only blocks ``kept`` (renumbered), and ``heal_maps`` folded in as the eval
    backend folds them."""
    from vllm_miprun.model.architectures import for_config
    from vllm_miprun.model.architectures.hf_model import delete_blocks

    model = delete_blocks(load_hf(model_dir, dtype, patch), kept)
    if heal_maps:
        from vllm_miprun.pipeline import heal

        family = for_config(json.loads((Path(model_dir) / "config.json").read_text()))
        heal.fold_into_model(model, heal_maps, kept, family.heal_site)
    return model


def token_ids(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    """Each prompt as the checkpoint's tokenizer encodes it (special tokens included, as vLLM does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(prompt).input_ids for prompt in prompts]


def greedy(model, prompts: list[list[int]], steps: int,
           use_cache: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens per prompt (token ids) and each one's log-prob. Without ``use_cache`` every
    step runs the whole sequence again: the plainest decode."""
    import torch

    tokens, logprobs = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids, past, out, lps = torch.tensor([prompt]), None, [], []
            for _ in range(steps):
                result = model(input_ids=ids, past_key_values=past, use_cache=use_cache)
                logp = torch.log_softmax(result.logits[0, -1].float(), -1)
                token = int(logp.argmax())
                out.append(token)
                lps.append(float(logp[token]))
                if use_cache:  # feed only the new token
                    past, ids = result.past_key_values, torch.tensor([[token]])
                else:
                    ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            tokens.append(out)
            logprobs.append(lps)
    return tokens, logprobs
