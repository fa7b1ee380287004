"""Quality of a (pruned) model: held-out perplexity, zero-shot multiple choice, generation.

Every task reduces to log-likelihood requests ``(context tokens, continuation tokens)``
answered by a backend with one method, ``loglikelihood(requests) -> list[float]`` (the
sum of the continuation tokens' log-probabilities, in nats):

* ``VllmBackend`` (in ``vllm/eval_backend.py``): the model as served, ``vllm.LLM`` (with
  ``load_format="miprun"`` when pruning), reading the prompt tokens' log-probabilities (``prompt_logprobs=0``).
  vLLM starts its workers with spawn: a script that calls it needs an
  ``if __name__ == "__main__":`` guard, or the engine fails to start.
* ``TransformersBackend``: the Hugging Face model with the pruned blocks deleted from
  ``model.layers`` (the kept blocks keep their weights and per-layer attention type,
  and are renumbered for the KV cache), as an independent check of the served model.

Tasks (``TASKS``, their examples and the lm-eval tokenisation live in ``tools/eval_tasks.py``):
perplexity (``wiki-ppl``, ``c4-ppl``) over the *evaluation* split of the bundled corpora,
the first ``limit`` (default 16) non-overlapping windows of ``seq_len`` (default 512)
tokens, each scored on its tokens 1..seq_len-1, ppl = exp(total NLL / scored tokens);
zero-shot multiple choice, each choice scored by the sum of its log-probabilities:
``acc`` takes the argmax, ``acc_norm`` the argmax of sum / characters of the choice
(lm-eval's length normalisation); and generative measures that read greedy decoding
(``greedy(prompts, max_tokens)``, the backends' second method; ``tools/eval_generate.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from vllm_miprun.errors import EvalError  # noqa: F401 - re-exported
from vllm_miprun.tools import eval_generate as gen
from vllm_miprun.tools.eval_tasks import (  # noqa: F401 - MC_TASKS, GEN_TASKS: the sets benchmarks use
    GEN_TASKS,
    MC_TASKS,
    TASKS,
    MCExample,
    Request,
    fit_request,
    load_examples,
    mc_requests,
    parse_tasks,
)

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers")
DEFAULT_PPL_WINDOWS = 16
DEFAULT_SEQ_LEN = 512


# --------------------------------------------------------------------------- backends


class LoglikelihoodBackend(Protocol):
    tokenizer: Any
    max_length: int
    kept: list[int] | None
    num_blocks: int

    def loglikelihood(self, requests: list[Request], progress: bool = False) -> list[float]:
        """Sum of the continuation tokens' log-probabilities (nats), per request."""

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """``max_tokens`` greedily decoded tokens per prompt (end-of-text does not stop)."""

    def close(self) -> None: ...


def _torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise EvalError(f"dtype must be one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


def delete_blocks(model, kept: Sequence[int]):
    """Keep only blocks ``kept`` of a Hugging Face causal LM, renumbered 0..K-1, in place
    (through the model's architecture family, so per-layer config fields follow)."""
    from vllm_miprun.model.architectures.hf_model import delete_blocks as delete_family_blocks

    return delete_family_blocks(model, kept)


class TransformersBackend:
    """A Hugging Face model with the pruned blocks deleted, scored in batches."""

    def __init__(self, model_dir: str | Path, kept: Sequence[int] | None = None, dtype: str = "float32",
                 device: str = "cpu", max_batch_tokens: int = 4096, max_length: int | None = None,
                 heal_maps: dict | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype),
                                                          attn_implementation="sdpa").to(device).eval()
        self.num_blocks = len(self.model.model.layers)
        self.kept = sorted(kept) if kept is not None else None
        if kept is not None:
            delete_blocks(self.model, kept)
            if heal_maps:
                from vllm_miprun.model.checkpoint import read_config
                from vllm_miprun.pipeline.heal import fold_into_model, heal_site

                fold_into_model(self.model, heal_maps, sorted(kept), heal_site(read_config(model_dir)))
        self.device, self.max_batch_tokens = device, max_batch_tokens
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length or limit, limit)

    def loglikelihood(self, requests: list[Request], progress: bool = False) -> list[float]:
        import torch

        with torch.inference_mode():
            return self._loglikelihood(requests, progress)

    def _loglikelihood(self, requests: list[Request], progress: bool) -> list[float]:
        import torch

        fitted = [fit_request(r, self.max_length) for r in requests]
        order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
        results = [0.0] * len(fitted)
        bar = tqdm(total=len(fitted), desc="loglikelihood", disable=not progress, leave=False)
        start = 0
        while start < len(order):
            longest = len(fitted[order[start]][0]) + len(fitted[order[start]][1])
            size = max(1, self.max_batch_tokens // longest)
            batch = order[start:start + size]
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = fitted[i][0] + fitted[i][1]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            hidden = self.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      use_cache=False).last_hidden_state
            for row, i in enumerate(batch):
                ctx, cont = fitted[i]
                positions = slice(len(ctx) - 1, len(ctx) + len(cont) - 1)  # state t predicts token t+1
                logits = self.model.lm_head(hidden[row, positions]).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(cont, device=logprobs.device).unsqueeze(1)
                results[i] = float(logprobs.gather(1, target).sum())
            bar.update(len(batch))
            start += size
        bar.close()
        return results

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return gen.hf_greedy(self.model, prompts, max_tokens, pad)

    def close(self) -> None:
        del self.model
        gc.collect()


# --------------------------------------------------------------------------- metrics


def perplexity(backend: LoglikelihoodBackend, windows: np.ndarray | Sequence[Sequence[int]],
               progress: bool = False) -> dict[str, Any]:
    """Perplexity of token windows, each scored on its tokens 1..end given the ones before."""
    requests = [([int(w[0])], [int(t) for t in w[1:]]) for w in windows]
    if not requests or any(not cont for _, cont in requests):
        raise EvalError("perplexity needs at least one window of two or more tokens")
    logliks = backend.loglikelihood(requests, progress=progress)
    tokens = sum(len(cont) for _, cont in requests)
    nll = -sum(logliks) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "windows": len(requests), "tokens": tokens}


def score_examples(backend: LoglikelihoodBackend, examples: Sequence[MCExample],
                   progress: bool = False) -> dict[str, Any]:
    """acc and acc_norm of multiple-choice examples, from one batch of requests."""
    requests, owner = [], []
    for n, example in enumerate(examples):
        if not 0 <= example.gold < len(example.continuations):
            raise EvalError(f"example {n} has gold index {example.gold} for {len(example.continuations)} choices")
        for request in mc_requests(backend.tokenizer, example):
            requests.append(request)
            owner.append(n)
    logliks = backend.loglikelihood(requests, progress=progress)
    per_example: list[list[float]] = [[] for _ in examples]
    for n, value in zip(owner, logliks):
        per_example[n].append(value)
    correct = correct_norm = 0
    for example, scores in zip(examples, per_example):
        correct += int(np.argmax(scores)) == example.gold
        normed = [s / max(1, length) for s, length in zip(scores, example.norm_lengths)]
        correct_norm += int(np.argmax(normed)) == example.gold
    count = len(examples)
    return {"acc": correct / count, "acc_norm": correct_norm / count, "examples": count,
            "requests": len(requests), "tokens": sum(len(c) + len(k) for c, k in requests)}


# --------------------------------------------------------------------------- driver


def _resolve_prune(model_dir: Path, prune) -> tuple[list[int] | None, dict[str, Any] | None]:
    """``prune`` is None, explicit kept indices, or plan options (``model_loader_extra_config``)."""
    if prune is None:
        return None, None
    if hasattr(prune, "calibration") and hasattr(prune, "to_json"):  # a MiprunOptions
        raw = prune.to_json()
        prune = {k: v for k, v in {**raw.pop("calibration"), **raw}.items() if v is not None}
    if isinstance(prune, Mapping):
        from vllm_miprun.options import MiprunOptions

        MiprunOptions.from_dict(dict(prune))  # validate before any model is loaded
        return None, dict(prune)
    return sorted(int(i) for i in prune), None


def make_backend(model_dir: str | Path, backend: str = "vllm", prune=None, dtype: str = "float32",
                 max_model_len: int | None = None, **kwargs: Any) -> LoglikelihoodBackend:
    """A ready backend. ``prune``: None (dense), kept indices (transformers only) or plan options."""
    if backend not in BACKENDS:
        raise EvalError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    model_dir = Path(model_dir)
    kept, options = _resolve_prune(model_dir, prune)
    if backend == "vllm":
        if kept is not None:
            raise EvalError("the vllm backend prunes through the miprun loader: pass plan options "
                            "such as {'keep': 0.75, 'method': 'last'}, not kept indices")
        from vllm_miprun.vllm.eval_backend import VllmBackend

        return VllmBackend(model_dir, options=options, dtype=dtype, max_model_len=max_model_len, **kwargs)
    if options is not None:
        from vllm_miprun.model.checkpoint import read_config
        from vllm_miprun.options import MiprunOptions
        from vllm_miprun.pipeline.plan import make_plan

        from vllm_miprun.pipeline.heal import prepare_maps

        parsed = MiprunOptions.from_dict(options)
        plan = make_plan(model_dir, parsed, hf_config=read_config(model_dir))
        kept = list(plan.kept)
        kwargs["heal_maps"] = prepare_maps(model_dir, parsed, kept, plan.num_blocks)
    return TransformersBackend(model_dir, kept=kept, dtype=dtype, max_length=max_model_len, **kwargs)


def evaluate(model_dir: str | Path, tasks: str | Sequence[str], *, backend: str | LoglikelihoodBackend = "vllm",
             prune: Sequence[int] | Mapping[str, Any] | None = None, limit: int | None = None, seed: int = 0,
             ppl_limit: int | None = None, seq_len: int = DEFAULT_SEQ_LEN, dtype: str = "float32",
             max_model_len: int | None = None, progress: bool = True, reference: dict | None = None,
             **backend_kwargs: Any) -> dict[str, Any]:
    """Per-task metrics and metadata for one model (vLLM: call under a ``__main__`` guard).

    ``prune``: None for the dense model, plan options (``{"keep": 0.75, "method": "last"}``,
    the loader's ``model_loader_extra_config``) or, transformers only, kept block indices.
    ``limit``: windows per perplexity task (default 16) and examples per zero-shot task
    (default all); ``ppl_limit``, when given, overrides it for the perplexity tasks.
    A ready backend object may be passed instead of a name (it is not closed).
    ``reference``: a dict that keeps the dense model's greedy continuations for
    ``greedy-agreement`` across calls (one per run); a pruned model with none there loads
    the dense model of the same backend first (a ready backend object needs them there).
    """
    names = parse_tasks(tasks)
    for label, value in (("limit", limit), ("ppl_limit", ppl_limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalError(f"{label} must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise EvalError(f"seq_len must be at least 2, got {seq_len}")
    given_kept, options = _resolve_prune(Path(model_dir), prune)  # validated before any load
    start = time.perf_counter()
    own = isinstance(backend, str)
    reference = {} if reference is None else reference
    dense_key = gen.reference_key(model_dir, backend if own else type(backend).__name__, dtype)
    if "greedy-agreement" in names and own and prune is not None and dense_key not in reference:
        gen.dense_continuations(model_dir, backend, dtype, reference,  # before the pruned model is loaded
                                lambda *a, **k: make_backend(*a, max_model_len=max_model_len, **k, **backend_kwargs))
    engine = make_backend(model_dir, backend, prune, dtype=dtype, max_model_len=max_model_len,
                          **backend_kwargs) if own else backend
    load_seconds = time.perf_counter() - start
    results: dict[str, Any] = {}
    try:
        for name in tqdm(names, desc="tasks", disable=not progress or len(names) < 2):
            t0 = time.perf_counter()
            spec = TASKS[name]
            if spec.kind == "perplexity":
                from vllm_miprun.pipeline.corpora import sample_token_windows

                if seq_len > engine.max_length:
                    raise EvalError(f"seq_len {seq_len} exceeds the model window {engine.max_length}; "
                                    "lower --seq-len or raise --max-model-len")
                count = ppl_limit or limit or DEFAULT_PPL_WINDOWS
                windows = sample_token_windows(engine.tokenizer, spec.source, count, seq_len, seed,
                                               part="evaluation")
                metrics = perplexity(engine, windows, progress=progress)
            elif name == "greedy-agreement":
                if dense_key not in reference:  # only the dense model may be its own reference
                    if engine.kept is not None and len(engine.kept) < engine.num_blocks:
                        raise EvalError("greedy-agreement of a ready pruned backend needs the dense continuations: "
                                        "pass reference= from an evaluate() call on the dense model")
                    reference[dense_key] = engine.greedy(gen.agreement_prompts(engine.tokenizer), gen.AGREEMENT_TOKENS)
                    metrics = gen.agreement_metrics(reference[dense_key], reference[dense_key], gen.AGREEMENT_TOKENS)
                else:
                    metrics = gen.greedy_agreement(engine, reference[dense_key])
            elif name == "lambada-em":
                metrics = gen.lambada_exact_match(engine, gen.LAMBADA_EXAMPLES, seed)
            else:
                metrics = score_examples(engine, load_examples(name, limit, seed), progress=progress)
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
            results[name] = metrics
            logger.info("%s: %s", name, {k: v for k, v in metrics.items()})
    finally:
        if own:
            engine.close()
    mc = [results[n]["acc_norm"] for n in names if TASKS[n].kind == "multiple_choice"]
    kept = engine.kept
    return {
        "model": str(model_dir),
        "backend": backend if own else type(backend).__name__,
        "prune": options if options is not None else given_kept,
        "num_blocks": engine.num_blocks,
        "kept": kept if kept is not None else list(range(engine.num_blocks)),
        "pruned": sorted(set(range(engine.num_blocks)) - set(kept)) if kept is not None else [],
        "dtype": dtype, "limit": limit, "ppl_limit": ppl_limit, "seed": seed, "seq_len": seq_len,
        "tasks": results,
        "mc_avg_acc_norm": (sum(mc) / len(mc)) if mc else None,
        "load_seconds": round(load_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --------------------------------------------------------------------------- CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vllm_miprun.option_flags import add_command_flags
    from vllm_miprun.options import command_options

    parser.add_argument("model_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("--tasks", default="wiki-ppl,c4-ppl",
                        help=f"comma-separated: {', '.join(TASKS)}; or all, mc, ppl, gen")
    # Plan options from the option table (omit every target for the dense model).
    add_command_flags(parser, command_options("eval"))
    parser.add_argument("--extra-config", default=None,
                        help="more plan options as JSON, e.g. '{\"seed\": 1, \"estimator\": \"renyi\"}'")
    parser.add_argument("--backend", choices=BACKENDS, default="vllm")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"windows per perplexity task (default {DEFAULT_PPL_WINDOWS}) and examples "
                        "per zero-shot task (default all)")
    parser.add_argument("--ppl-limit", type=int, default=None, help="windows per perplexity task (overrides --limit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zero-shot example subset")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per perplexity window")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-model-len", type=int, default=None, help="token window (default min(2048, model's))")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``subparsers`` object; the parsed args carry ``func=eval_main``."""
    parser = subparsers.add_parser("eval", help="perplexity and zero-shot accuracy of a (pruned) model")
    add_eval_arguments(parser)
    parser.set_defaults(func=eval_main)
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--extra-config`` with the plan flags on top; None for the dense model."""
    from vllm_miprun import strict_json
    from vllm_miprun.option_flags import given_options
    from vllm_miprun.option_values import shown
    from vllm_miprun.options import TARGETS, command_options

    try:  # strict: a key given twice is refused, as in --model-loader-extra-config
        options = strict_json.loads(args.extra_config) if args.extra_config else {}
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise EvalError(f"--extra-config must be a JSON object, got {shown(args.extra_config)} "
                        f"({' '.join(str(err).split())[:200]})") from None
    if not isinstance(options, dict):
        raise EvalError(f"--extra-config must be a JSON object, got {shown(args.extra_config)}")
    options.update(given_options(args, command_options("eval")))
    if options and not any(target in options for target in TARGETS):
        raise EvalError("plan options need a target: add --keep R, --latency-budget B, --quality-budget R "
                        "or --drop BLOCKS")
    return options or None


def format_table(report: dict[str, Any]) -> str:
    pruned = report["pruned"]
    lines = [f"model {report['model']}  backend {report['backend']}  blocks kept "
             f"{len(report['kept'])}/{report['num_blocks']}" + (f"  pruned {pruned}" if pruned else ""),
             f"{'task':<15}{'metric':<10}{'value':>10}{'n':>8}{'seconds':>10}"]
    for name, m in report["tasks"].items():
        if "ppl" in m:
            lines.append(f"{name:<15}{'ppl':<10}{m['ppl']:>10.3f}{m['windows']:>8}{m['seconds']:>10.1f}")
        elif "mean_prefix" in m:
            lines.append(f"{name:<17}{'prefix':<8}{m['mean_prefix']:>10.2f}{m['prompts']:>8}{m['seconds']:>10.1f}")
            lines.append(f"{'':<17}{'full':<8}{m['full_match']:>10.4f}")
        elif "exact_match" in m:
            lines.append(f"{name:<15}{'em':<10}{m['exact_match']:>10.4f}{m['examples']:>8}{m['seconds']:>10.1f}")
        else:
            lines.append(f"{name:<15}{'acc':<10}{m['acc']:>10.4f}{m['examples']:>8}{m['seconds']:>10.1f}")
            lines.append(f"{'':<15}{'acc_norm':<10}{m['acc_norm']:>10.4f}")
    if report["mc_avg_acc_norm"] is not None:
        lines.append(f"{'zero-shot avg':<15}{'acc_norm':<10}{report['mc_avg_acc_norm']:>10.4f}")
    return "\n".join(lines)


def eval_main(args: argparse.Namespace) -> int:
    """Run ``vllm-miprun eval`` from parsed args; prints a table or one JSON object; returns 0.

    With ``--json`` the object is the last stdout line. vLLM logs to stdout by default, so
    ``VLLM_LOGGING_STREAM`` is pointed at stderr here, which takes effect if vLLM has not
    been imported yet in this process (its workers always inherit it).
    """
    if args.json:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    report = evaluate(args.model_dir, args.tasks, backend=args.backend, prune=options_from_args(args),
                      limit=args.limit, ppl_limit=args.ppl_limit, seed=args.seed, seq_len=args.seq_len,
                      dtype=args.dtype, max_model_len=args.max_model_len, progress=True)  # bars go to stderr
    print(json.dumps(report) if args.json else format_table(report))  # CLI output, not library logging
    return 0


def main(argv: list[str] | None = None) -> int:
    from vllm_miprun.errors import run_command
    from vllm_miprun.option_flags import command_line_wording

    prog = "python -m vllm_miprun.tools.evaluate"
    args = add_eval_arguments(argparse.ArgumentParser(prog=prog)).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(prog, lambda: eval_main(args), wording=command_line_wording)


if __name__ == "__main__":
    raise SystemExit(main())
