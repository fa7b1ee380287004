"""Healing research, second stage: fit the per-run maps on the next-token KL, not on states.

``heal_research.py`` fits each run's map ``T`` by least squares on the run's residual
stream (``h_j ≈ r_{i-1} + T d_{i-1}``), one run at a time. Its best safe form (one scale per
channel, ``diag``) gave 0.986× at keep 0.75 and 0.852× at keep 0.6 on the unlike domains;
the goal is ≤ 0.85× at both with no domain more than 2% worse.

This stage keeps the same foldable forms and the same calibration text (wiki + c4, 64 × 256
tokens) and changes only the objective: all of a plan's maps together minimise
``KL(p_dense ‖ p_pruned)`` of the next-token distribution on the calibration tokens, by
Adam on the map parameters alone (the model's weights are frozen), starting from the
least-squares maps of the same form.
The maps still fold into the weights exactly as before (``diag`` into ``down_proj`` rows
or a norm's gain), so serving cost stays zero.

Choices are made on the **validation** halves of the four unlike
domains; the **final** halves are read once for the table.

Run: ``PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_kl_research.py``
→ ``benchmarks/results/heal_kl_research.json`` (resumable) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heal_research as base  # noqa: E402  (the first stage's data, walk and perplexity)

from vllm_miprun.core import heal_math  # noqa: E402
from vllm_miprun.pipeline import corpora  # noqa: E402
from vllm_miprun.tools import assets  # noqa: E402

OUT = base.OUT / "heal_kl_research.json"
# name: (form, steps, learning rate); each KL fit starts from the least-squares fit of its form
KL_VARIANTS = {
    "diag kl steps=100": ("diag", 100, 1e-2),
    "full kl steps=100": ("full", 100, 2e-4),
}
RIDGE_FULL = 1e-2  # the full form's least-squares ridge chosen by heal_research.py


def dense_targets(model, calib: torch.Tensor, first: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's stream entering block ``first`` and its final normed state, per window."""
    n = model.config.num_hidden_layers
    entering, final = [], []
    for start in range(0, len(calib), batch):
        ids = calib[start:start + batch]
        grabbed = {}

        def grab(b, r, d):
            if b == first - 1:
                grabbed["h"] = (r + d).clone()
            return d

        h = base.walk(model, ids, list(range(n)), grab)
        entering.append(grabbed["h"] if first > 0 else model.model.embed_tokens(ids))
        final.append(model.model.norm(h))
    return torch.cat(entering), torch.cat(final)


def tail(model, h: torch.Tensor, blocks: list[int], scales: dict[int, torch.Tensor]) -> torch.Tensor:
    """The pruned model's stream from ``h`` through ``blocks``, each map scaling its block's MLP output."""
    inner = model.model
    pos = inner.rotary_emb(h, position_ids=torch.arange(h.shape[1]).unsqueeze(0))
    for b in blocks:
        r, d = base.block_parts(inner.layers[b], h, pos)
        if b in scales:
            d = d * scales[b] if scales[b].dim() == 1 else d @ scales[b].T
        h = r + d
    return inner.norm(h)


def kl_fit(model, calib: torch.Tensor, pruned: list[int], init: dict[int, torch.Tensor], steps: int,
           ridge: float, lr: float = 1e-2, batch: int = 2, seed: int = 0, full: bool = False,
           on_step=None) -> tuple[dict[int, torch.Tensor], list]:
    """Adam on the maps (full matrices, or the diagonal's scales) for ``KL(dense ‖ pruned)`` over
    ``calib``'s next tokens. ``on_step(steps_done, maps)``, if given, sees the maps after every step."""
    n = model.config.num_hidden_layers
    kept = [b for b in range(n) if b not in set(pruned)]
    first = min(init)
    with torch.no_grad():
        entering, dense_final = dense_targets(model, calib, first)
    blocks = [b for b in kept if b >= first]
    params = {b: (t.clone() if full else torch.diagonal(t).clone()).requires_grad_(True) for b, t in init.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for step in range(steps):
        rows = torch.randperm(len(calib), generator=gen)[:batch]
        with torch.no_grad():
            target = torch.log_softmax(model.lm_head(dense_final[rows]).float(), dim=-1)
        out = tail(model, entering[rows], blocks, params)
        logp = torch.log_softmax(model.lm_head(out).float(), dim=-1)
        kl = (target.exp() * (target - logp)).sum(-1).mean()
        pull = sum(((p - (torch.eye(len(p)) if full else 1)) ** 2).sum() for p in params.values()) * ridge
        opt.zero_grad()
        (kl + pull).backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, {b: p.detach().clone() if full else torch.diag(p.detach()) for b, p in params.items()})
        if step % 25 == 0 or step == steps - 1:
            trace.append((step, round(float(kl.detach()), 4)))
            print(f"  step {step} kl {float(kl):.4f}", flush=True)
    return {b: p.detach() if full else torch.diag(p.detach()) for b, p in params.items()}, trace


def frozen_smollm2():
    """SmolLM2-135M's tokenizer and float32 model, every weight frozen (seed 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder = assets.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return AutoTokenizer.from_pretrained(folder), model


def calibration_mix(tok, samples: int, length: int) -> torch.Tensor:
    """The maps' calibration text: ``samples`` windows of wiki, then as many of c4 (seed 0)."""
    return torch.from_numpy(np.concatenate([corpora.sample_token_windows(tok, name, samples, length, 0)
                                            for name in ("wiki", "c4")]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--val-windows", type=int, default=2)
    parser.add_argument("--final-windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tok, model = frozen_smollm2()
    data = base.eval_windows(tok, args.seq_len, args.val_windows, args.final_windows)
    calib = calibration_mix(tok, args.calib_samples, args.calib_len)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report["command"] = ("PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_kl_research.py "
                         + " ".join(argv or sys.argv[1:])).strip()
    report["settings"] = vars(args) | {"out": str(args.out), "variants": KL_VARIANTS}
    n = model.config.num_hidden_layers

    def save():
        base.save_report(report, args.out)

    def ppl(keep, transforms, part, domains):
        kept = [b for b in range(n) if b not in set(base.PRUNED[keep])]
        with torch.inference_mode():
            return {d: round(base.perplexity(model, data[d][part], kept, transforms), 3) for d in domains}

    for keep, pruned in base.PRUNED.items():
        rows = report.setdefault(keep, {"val": {}, "final": {}})
        runs = heal_math.pruned_runs(pruned)
        with torch.inference_mode():
            dense = base.dense_capture(model, calib, runs)
            start = {form: base.fit_runs(model, calib, pruned, dense, {"calib": "mix", "form": form, "ridge": ridge})[0]
                     for form, ridge in (("diag", 0.0), ("full", RIDGE_FULL))}
        variants = {"none": None, "diag lstsq": start["diag"], f"full lstsq λ={RIDGE_FULL:g}": start["full"]}
        variants.update(KL_VARIANTS)
        for name, how in variants.items():
            if name in rows["val"] and name in rows["final"]:
                continue
            t0 = time.time()
            trace = []
            if how is None:
                maps = {}
            elif isinstance(how, dict):
                maps = how
            else:
                print(keep, name, flush=True)
                form, steps, lr = how
                maps, trace = kl_fit(model, calib, pruned, start[form], steps, 0.0, lr=lr, full=form == "full")
            fit_s = round(time.time() - t0, 1)
            rows["val"][name] = {"ppl": ppl(keep, maps, "val", base.UNLIKE), "fit_s": fit_s, "trace": trace}
            rows["final"][name] = {"ppl": ppl(keep, maps, "final", base.ALL_DOMAINS)}
            print(keep, name, rows["val"][name]["ppl"], flush=True)
            save()
    write_markdown(report, args.out.with_suffix(".md"))
    return 0


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"Made by: `{report['command']}`", ""] + ([report["note"], ""] if report.get("note") else []) + [
             "geomean = geometric mean of healed/unhealed perplexity over the unlike domains; "
             "worst = largest single-domain change against unhealed.", ""]
    for part, domains in (("val", base.UNLIKE), ("final", base.ALL_DOMAINS)):
        lines += [f"### {'Validation' if part == 'val' else 'Final'} halves", "",
                  "| keep | method | " + " | ".join(domains) + " | geomean ×unlike | worst |",
                  "|---|---|" + "---|" * (len(domains) + 2)]
        for keep in base.PRUNED:
            rows = report[keep][part]
            plain = rows["none"]["ppl"]
            for name, row in rows.items():
                p = row["ppl"]
                worst, change = base.worst_change(p, plain, domains)
                lines.append(f"| {keep} | {name} | " + " | ".join(f"{p[d]:.1f}" for d in domains)
                             + f" | {base.geomean_ratio(p, plain, base.UNLIKE):.3f} | {worst} {change:+.1%} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
