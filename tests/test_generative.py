"""Generative measures (tools/eval_generate.py) on a tiny random Llama and hand-made cases.

* A "pruned" model that keeps every block is the dense model: agreement 32/32, full match 1.
* Removing one block changes the greedy text: agreement below 32.
* Batched, left-padded greedy decoding with a KV cache gives the tokens of a plain argmax
  loop over full forward passes (no padding, no cache), prompt by prompt.
* Exact-match and prefix scoring on hand-made cases.
* bench_quality's ``--add-gen`` writes the measures into existing records and keeps the rest.
"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from test_bench_quality import bench_quality
from vllm_miprun.tools import eval_generate as gen
from vllm_miprun.tools import evaluate as ev


def test_matching_prefix_and_agreement_on_hand_made_sequences():
    assert gen.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert gen.matching_prefix([5, 6], [7, 6]) == 0
    assert gen.matching_prefix([1, 2, 3], [1, 2, 3]) == 3
    metrics = gen.agreement_metrics([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 3, 4], [1, 9, 3, 4]], 4)
    assert metrics["mean_prefix"] == 2.5 and metrics["full_match"] == 0.5 and metrics["prompts"] == 2
    with pytest.raises(ev.EvalError, match="as many"):
        gen.agreement_metrics([[1]], [[1], [2]], 1)
    with pytest.raises(ev.EvalError, match="as many"):
        gen.agreement_metrics([], [], 4)
    one_short = gen.agreement_metrics([[1, 2, 3, 4]], [[1, 2, 3, 9]], 4)  # 3 of 4: not a full match
    assert one_short["mean_prefix"] == 3 and one_short["full_match"] == 0.0
    # only the first ``length`` tokens count, however long the continuations
    assert gen.agreement_metrics([[1, 2, 3]], [[1, 2, 3]], 2) == {"mean_prefix": 2.0, "full_match": 1.0,
                                                                 "prompts": 1, "tokens": 2}


def test_agreement_prompts_are_every_strided_window_of_the_held_out_wiki_text():
    from transformers import AutoTokenizer

    from tiny_models import tokenizer_dir
    from vllm_miprun.pipeline.corpora import sample_token_windows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    prompts = gen.agreement_prompts(tokenizer)
    stride, length = gen.AGREEMENT_STRIDE, gen.AGREEMENT_PROMPT_LEN
    assert len(prompts) == gen.AGREEMENT_PROMPTS and {len(p) for p in prompts} == {length}
    held_out = sample_token_windows(tokenizer, "wiki", 2 * stride + 1, length, 0, part="evaluation")
    assert prompts[:3] == [[int(t) for t in held_out[i * stride]] for i in range(3)]


@pytest.mark.parametrize("generated, answer, right", [
    (" signs. And then", "signs", True),
    ("\n“Shane,” she said", "Shane", True),
    (" Signs", "signs", False),  # case-sensitive, as LAMBADA
    (" sign", "signs", False),
    (" signsmith", "signs", False),
    ("", "signs", False),
    (" anything", "", False),
    ("", "", False),  # an empty answer is never matched, not even by empty text
])
def test_exact_match_takes_the_first_word_without_punctuation(generated, answer, right):
    assert gen.exact_match(generated, answer) is right


def test_lambada_examples_are_seeded_passages_missing_their_last_word():
    examples = gen.lambada_examples(limit=8, seed=0)
    assert len(examples) == 8 and examples == gen.lambada_examples(limit=8, seed=0)
    assert examples != gen.lambada_examples(limit=8, seed=1)
    for context, answer in examples:
        assert answer and " " not in answer and not context.endswith(answer)


def test_batched_greedy_matches_a_plain_argmax_loop(tiny_llama_dir):
    backend = ev.TransformersBackend(tiny_llama_dir)
    prompts = [[5, 17, 33, 2, 90, 11, 7], [40, 41], [300, 12, 8, 8]]  # unequal lengths: left padding
    batched = backend.greedy(prompts, 6)
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, batched):
            seq = list(prompt)
            for _ in range(6):
                seq.append(int(backend.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            assert tokens == seq[len(prompt):]


def test_dense_agrees_fully_with_itself_and_a_removed_block_agrees_less(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(gen, "AGREEMENT_PROMPTS", 8)
    reference: dict = {}
    everything = ev.evaluate(tiny_llama_dir, "greedy-agreement", backend="transformers", prune=list(range(8)),
                             progress=False, reference=reference)["tasks"]["greedy-agreement"]
    assert everything["mean_prefix"] == gen.AGREEMENT_TOKENS and everything["full_match"] == 1.0
    assert everything["prompts"] == gen.AGREEMENT_PROMPTS and len(reference) == 1
    cut = ev.evaluate(tiny_llama_dir, "greedy-agreement", backend="transformers", prune=[0, 1, 2, 4, 5, 6, 7],
                      progress=False, reference=reference)["tasks"]["greedy-agreement"]
    assert cut["mean_prefix"] < 0.9 * gen.AGREEMENT_TOKENS and cut["full_match"] < 1.0, cut
    backend = ev.TransformersBackend(tiny_llama_dir, kept=[0, 1, 2, 4, 5, 6, 7])
    with pytest.raises(ev.EvalError, match="reference="):  # a ready pruned backend cannot be its own reference
        ev.evaluate(tiny_llama_dir, "greedy-agreement", backend=backend, progress=False)


def test_add_gen_fills_the_measures_into_existing_records(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "AGREEMENT_PROMPTS", 8)  # as the test above: prompts read once
    monkeypatch.setattr(gen, "LAMBADA_EXAMPLES", 4)
    ppl = {"wiki-ppl": {"ppl": 9.0}, "c4-ppl": {"ppl": 11.0}}
    records = [{"row": "dense", "keep": 1.0, "seed": 0, "heal": "none", "eval": {"tasks": dict(ppl)}},
               {"row": "last", "keep": 0.9, "seed": 0, "heal": "none", "kept": [0, 1, 2, 3, 4, 5, 6],
                "pruned": [7], "eval": {"tasks": dict(ppl)}},
               {"row": "last", "keep": 0.5, "seed": 0, "heal": "none", "kept": [0, 1, 2, 3], "pruned": [4, 5, 6, 7],
                "eval": {"tasks": dict(ppl)}}]
    (tmp_path / "q.json").write_text(json.dumps({
        "backend": "transformers", "limit": 20, "ppl_windows": 8, "seq_len": 512, "dtype": "float32",
        "commands": [{"command": "first", "rows": ["dense", "last"]}], "records": records, "stability": {}}))
    args = Namespace(out=tmp_path, name="q", backend="transformers", dtype="float32", rows="dense,last",
                     ratios=(0.9,), gen_tasks=("greedy-agreement", "lambada-em"), seed=0, model=tmp_path,
                     reference={}, limit=20, ppl_windows=8, seq_len=512, heal=False)
    args.model = tiny_llama_dir
    bench_quality.gen_table.add_generative(args, bench_quality.write_outputs, {})
    saved = json.loads((tmp_path / "q.json").read_text())
    dense, cut, untouched = saved["records"]
    assert dense["eval"]["tasks"]["greedy-agreement"]["mean_prefix"] == gen.AGREEMENT_TOKENS
    assert cut["eval"]["tasks"]["greedy-agreement"]["mean_prefix"] < gen.AGREEMENT_TOKENS
    assert cut["eval"]["tasks"]["wiki-ppl"] == {"ppl": 9.0}  # perplexity kept, not recomputed
    assert "greedy-agreement" not in untouched["eval"]["tasks"]  # keep 0.5 was not asked for
    assert saved["commands"][0]["command"] == "first" and saved["commands"][-1]["added"] == list(args.gen_tasks)
    table = (tmp_path / "q.md").read_text()
    assert "| agree (of 32) | full match | lambada EM |" in table
    assert "| 0.5 | last | 9.0 | 11.0 | - | - | - | - |" in table
    assert (tmp_path / "q_gen.png").stat().st_size > 0


def test_add_gen_measures_a_healed_record_with_its_maps(tiny_llama_dir, tmp_path, monkeypatch):
    """``--add-gen --heal linear`` evaluates the healed record's model: its dropped blocks with
    the maps fitted on the record's calibration settings, not the plain pruned model again."""
    monkeypatch.setattr(gen, "AGREEMENT_PROMPTS", 8)
    monkeypatch.setattr(gen, "LAMBADA_EXAMPLES", 4)
    tasks = ("greedy-agreement", "lambada-em")
    base = {"row": "last", "keep": 0.5, "seed": 0, "kept": [0, 1, 2, 3], "pruned": [4, 5, 6, 7]}
    records = [{**base, "heal": "none", "eval": {"tasks": {"wiki-ppl": {"ppl": 9.0}}}},
               {**base, "heal": "linear", "eval": {"tasks": {"wiki-ppl": {"ppl": 8.0}}}}]
    (tmp_path / "q.json").write_text(json.dumps({
        "backend": "transformers", "dtype": "float32", "commands": [], "records": records, "stability": {}}))
    args = Namespace(out=tmp_path, name="q", backend="transformers", dtype="float32", rows="last", ratios=(0.5,),
                     gen_tasks=tasks, seed=0, model=tiny_llama_dir, reference={}, limit=20, ppl_windows=8,
                     seq_len=512, heal="linear", cache_root=tmp_path / "caches")
    calibration = {"samples": 4, "seq_len": 32}
    bench_quality.gen_table.add_generative(args, bench_quality.write_outputs, {"last": {"method": "last", **calibration}})
    plain, healed = json.loads((tmp_path / "q.json").read_text())["records"]
    assert list((tmp_path / "caches").glob("*-heal-*.safetensors"))  # fitted: this cache held no maps
    direct = ev.evaluate(tiny_llama_dir, list(tasks), backend="transformers", progress=False, reference={},
                         prune={**calibration, "drop": [4, 5, 6, 7], "heal": "linear",
                                "cache_dir": str(tmp_path / "caches")})["tasks"]
    for task in tasks:
        measured = {k: v for k, v in healed["eval"]["tasks"][task].items() if k != "seconds"}
        assert measured == {k: v for k, v in direct[task].items() if k != "seconds"}
    written = [r["eval"]["tasks"]["lambada-em"]["samples"] for r in (plain, healed)]
    assert written[0] != written[1]  # the maps change what the model writes
    assert healed["eval"]["tasks"]["wiki-ppl"] == {"ppl": 8.0}
    table = (tmp_path / "q.md").read_text()
    assert "| agree (of 32) | full match | lambada EM |" in table and "| 0.5 | last | linear |" in table
