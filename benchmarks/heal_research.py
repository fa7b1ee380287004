"""Healing research (issue 16): which linear map per pruned run generalises beyond calibration text?

On SmolLM2-135M (float32, transformers, CPU) with MI-PRUN's pruned sets from the committed
quality table, every method fits one map ``T`` per maximal pruned run ``[i, j)`` on the MLP
output of block ``i−1`` (``vllm_miprun.core.heal_math`` has the algebra), and is judged by
perplexity on text calibration never saw:

* calibration: the wiki and c4 *calibration* parts (``corpora.sample_token_windows``);
* held-out: the wiki and c4 *evaluation* parts, and the bundled TinyStories, technical, code
  and multilingual files. Each text is cut in two: a **validation** part (choices such as
  the ridge strength are made on it, on the four domains unlike calibration) and a
  **final** part, read only for the final table.

Run: ``PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_research.py``
→ ``benchmarks/results/heal_research.json`` (resumable: finished rows are kept) and
``heal_research.md``.
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

from vllm_miprun.core import heal_math
from vllm_miprun.pipeline import corpora, store
from vllm_miprun.tools import assets

PRUNED = {  # MI-PRUN's sets, README "Quality on SmolLM2-135M"
    "0.75": [12, 13, 14, 15, 16, 17, 18],
    "0.6": [3, 5, 7, 9, 12, 13, 14, 16, 17, 18, 22, 26],
}
UNLIKE = tuple(corpora.HELD_OUT_FILES)  # domains unlike calibration
ALL_DOMAINS = ("wiki", "c4") + UNLIKE
RIDGES = (1e-2, 1e-1, 1.0)
OUT = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- data


def split_file_windows(tokenizer, name: str, seq_len: int, n_val: int, n_final: int) -> dict[str, np.ndarray]:
    """An evaluation-only domain's two halves (``corpora.held_out_halves``): validation, final."""
    halves = dict(zip(("val", "final"), corpora.held_out_halves(name)))
    out = {}
    for part, count in (("val", n_val), ("final", n_final)):
        ids = tokenizer(halves[part], add_special_tokens=False)["input_ids"]
        need = count * seq_len
        assert len(ids) >= need, f"{name} {part}: {len(ids)} tokens < {need}"
        out[part] = np.asarray(ids[:need], dtype=np.int64).reshape(count, seq_len)
    return out


def eval_windows(tokenizer, seq_len: int, n_val: int, n_final: int) -> dict[str, dict[str, np.ndarray]]:
    data = {}
    for name in ("wiki", "c4"):  # evaluation part, documents in order: validation first, then final
        w = corpora.sample_token_windows(tokenizer, name, n_val + n_final, seq_len, 0, part="evaluation")
        data[name] = {"val": w[:n_val], "final": w[n_val:]}
    for name in UNLIKE:
        data[name] = split_file_windows(tokenizer, name, seq_len, n_val, n_final)
    return data


# --------------------------------------------------------------------------- model walk


def block_parts(layer, h, pos):
    """``(r, d)`` of one decoder block: after attention, and the MLP output."""
    r = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=pos, attention_mask=None)[0]
    return r, layer.mlp(layer.post_attention_layernorm(r))


def walk(model, ids: torch.Tensor, kept: list[int], on_block=None) -> torch.Tensor:
    """Residual stream after the kept blocks. ``on_block(b, r, d) -> d`` may replace a block's MLP output."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = inner.rotary_emb(h, position_ids=torch.arange(ids.shape[1]).unsqueeze(0))
    for b in kept:
        r, d = block_parts(inner.layers[b], h, pos)
        if on_block is not None:
            d = on_block(b, r, d)
        h = r + d
    return h


def perplexity(model, windows: np.ndarray, kept: list[int], transforms: dict[int, torch.Tensor],
               batch: int = 4) -> float:
    """Each window scored on tokens 1..end (as ``tools.evaluate.perplexity``); maps applied explicitly."""
    def apply(b, r, d):
        return d @ transforms[b].T if b in transforms else d

    nll, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = torch.from_numpy(windows[start:start + batch])
        h = model.model.norm(walk(model, ids, kept, apply))
        for row in range(ids.shape[0]):
            logits = model.lm_head(h[row, :-1]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[row, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def dense_capture(model, ids: torch.Tensor, runs) -> dict:
    """Dense-model ``(r, d)`` of each block ``i−1`` and ``h_j`` for every run, flattened to tokens."""
    need_parts = {i - 1 for i, _ in runs}
    need_out = {j - 1 for _, j in runs}
    cap: dict = {}

    def grab(b, r, d):
        if b in need_parts:
            cap[("r", b)] = r.reshape(-1, r.shape[-1]).clone()
            cap[("d", b)] = d.reshape(-1, d.shape[-1]).clone()
        if b in need_out:
            cap[("h", b + 1)] = (r + d).reshape(-1, r.shape[-1]).clone()
        return d

    walk(model, ids, list(range(max(need_out) + 1)), grab)
    return cap


def fit_runs(model, ids: torch.Tensor, pruned: list[int], dense: dict, method: dict) -> tuple[dict, list]:
    """One map per run; ``sequential`` fits each on the already-healed pruned prefix."""
    runs = heal_math.pruned_runs(pruned)
    assert all(i > 0 for i, _ in runs), "runs starting at block 0 are left unhealed (tied embeddings)"
    starts = {i - 1: (i, j) for i, j in runs}
    kept = [b for b in range(model.config.num_hidden_layers) if b not in set(pruned)]
    transforms: dict[int, torch.Tensor] = {}
    shares = []

    def fit(b, r, d):
        x = d.reshape(-1, d.shape[-1])
        rr = r.reshape(-1, r.shape[-1])
        i, j = starts[b]
        y = dense[("h", j)] - rr
        w = heal_math.token_weights(y, x, method.get("weights", "uniform"))
        t = heal_math.fit_map(x, y, form=method.get("form", "full"), ridge=method.get("ridge", 0.0),
                              rank=method.get("rank", 16), weights=w)
        transforms[b] = t
        shares.append(round(heal_math.residual_share(x, y, t), 4))
        return d @ t.T

    if method.get("sequential", False):
        last = max(starts)
        walk(model, ids, [b for b in kept if b <= last], lambda b, r, d: fit(b, r, d) if b in starts else d)
    else:
        for b in starts:
            fit(b, dense[("r", b)], dense[("d", b)])
    return transforms, shares


# --------------------------------------------------------------------------- study


def methods(best: dict[str, float]) -> dict[str, dict]:
    """Every method of the final table. ``best`` holds the ridge chosen on validation per calibration set."""
    lam = best.get("mix", 0.0)
    return {
        "none": {},
        "lstsq-wiki (issue baseline)": {"calib": "wiki"},
        f"ridge-mix λ={lam:g}": {"calib": "mix", "ridge": lam},
        "lstsq-mix": {"calib": "mix"},
        f"ridge-mix λ={lam:g} sequential": {"calib": "mix", "ridge": lam, "sequential": True},
        f"ridge-mix λ={lam:g} clip-outliers": {"calib": "mix", "ridge": lam, "weights": "clip"},
        f"ridge-mix λ={lam:g} cosine": {"calib": "mix", "ridge": lam, "weights": "cosine"},
        f"lowrank16+I-mix λ={lam:g}": {"calib": "mix", "ridge": lam, "form": "lowrank", "rank": 16},
        "diag-mix": {"calib": "mix", "form": "diag"},
        "rotdiag-mix (LinearPatch-style)": {"calib": "mix", "form": "rotdiag"},
        f"ridge-wiki λ={lam:g}": {"calib": "wiki", "ridge": lam},
    }


def geomean_ratio(ppl: dict, base: dict, domains) -> float:
    return math.exp(sum(math.log(ppl[d] / base[d]) for d in domains) / len(domains))


def worst_change(ppl: dict, base: dict, domains) -> tuple[str, float]:
    """The domain whose perplexity rises most against ``base`` (or falls least), and by how much."""
    worst = max(domains, key=lambda d: ppl[d] / base[d])
    return worst, ppl[worst] / base[worst] - 1


def save_report(report: dict, path: Path) -> None:
    """Write a research run's JSON atomically (a killed run resumes from the last whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(path, json.dumps(report, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32, help="windows of --calib-len per corpus")
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--val-windows", type=int, default=2)
    parser.add_argument("--final-windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heal-aware", action="store_true", help="also run the heal-aware span selection stage")
    parser.add_argument("--out", type=Path, default=OUT / "heal_research.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    data = eval_windows(tok, args.seq_len, args.val_windows, args.final_windows)
    wiki = corpora.sample_token_windows(tok, "wiki", args.calib_samples, args.calib_len, 0)
    c4 = corpora.sample_token_windows(tok, "c4", args.calib_samples, args.calib_len, 0)
    calib = {"wiki": torch.from_numpy(wiki), "mix": torch.from_numpy(np.concatenate([wiki, c4]))}
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    command = ("PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_research.py " + " ".join(argv or sys.argv[1:])).strip()
    report.setdefault("commands", [report.pop("command")] if "command" in report else [])
    if command not in report["commands"]:  # a resumed run keeps finished rows; every command is listed
        report["commands"].append(command)
    report.update({"settings": vars(args) | {"out": str(args.out)}, "pruned": PRUNED})
    report.setdefault("validation", {})
    report.setdefault("final", {})
    n = model.config.num_hidden_layers

    def save():
        save_report(report, args.out)

    with torch.inference_mode():
        all_runs = sorted({r for p in PRUNED.values() for r in heal_math.pruned_runs(p)})
        mixed = dense_capture(model, calib["mix"], all_runs)  # wiki is the mix's first part: slice it
        dense = {"mix": mixed, "wiki": {k: v[:calib["wiki"].numel()] for k, v in mixed.items()}}

        def evaluate(keep, method, part, domains):
            pruned = PRUNED[keep]
            kept = [b for b in range(n) if b not in set(pruned)]
            t0 = time.time()
            transforms, shares = ({}, []) if not method else fit_runs(model, calib[method["calib"]], pruned,
                                                                        dense[method["calib"]], method)
            ppl = {d: round(perplexity(model, data[d][part], kept, transforms), 3) for d in domains}
            return {"ppl": ppl, "residual_share": shares, "seconds": round(time.time() - t0, 1)}

        # 1. validation: ridge strength per calibration set, on the unlike domains' validation parts
        for keep in PRUNED:
            val = report["validation"].setdefault(keep, {})
            for name, method in [("none", {})] + [(f"{c} λ={lam:g}", {"calib": c, "ridge": lam})
                                                  for c in ("mix",) for lam in (0.0,) + RIDGES]:
                if name not in val:
                    val[name] = evaluate(keep, method, "val", UNLIKE)
                    print(keep, "val", name, val[name], flush=True)
                    save()
        for keep in PRUNED:  # the opt-in recipe's form: full ridge or diagonal, also decided on validation
            val = report["validation"][keep]
            if "mix diag" not in val:
                val["mix diag"] = evaluate(keep, {"calib": "mix", "form": "diag"}, "val", UNLIKE)
                print(keep, "val mix diag", val["mix diag"], flush=True)
                save()
        best = {}
        for c in ("mix",):  # one λ for all ratios: worst geomean ratio over keeps, lowest wins
            def score(lam):
                return max(geomean_ratio(report["validation"][k][f"{c} λ={lam:g}"]["ppl"],
                                         report["validation"][k]["none"]["ppl"], UNLIKE) for k in PRUNED)
            best[c] = min((0.0,) + RIDGES, key=score)
        report["chosen_ridge"] = best

        def val_summary(name):  # (worst-keep geomean ratio, worst single-domain change) on validation
            rows = [(report["validation"][k][name]["ppl"], report["validation"][k]["none"]["ppl"]) for k in PRUNED]
            return (round(max(geomean_ratio(p, b, UNLIKE) for p, b in rows), 4),
                    round(max(p[d] / b[d] - 1 for p, b in rows for d in UNLIKE), 4))

        candidates = {f"mix λ={best['mix']:g}": "full", "mix diag": "diag"}
        summary = {name: val_summary(name) for name in candidates}
        safe = [n for n in candidates if summary[n][1] <= 0.02] or list(candidates)
        report["recipe_choice"] = {"validation (geomean, worst change)": summary,
                                   "chosen": min(safe, key=lambda n: summary[n][0])}
        # 2. final table, read once per method
        for name, method in methods(best).items():  # method-major: a cut-short run still pairs the keeps
            for keep in PRUNED:
                fin = report["final"].setdefault(keep, {})
                one_run = len(heal_math.pruned_runs(PRUNED[keep])) == 1
                if name not in fin and not (one_run and method.get("sequential")):  # one run: same as independent
                    fin[name] = evaluate(keep, method, "final", ALL_DOMAINS)
                    print(keep, "final", name, fin[name], flush=True)
                    save()
        if args.heal_aware and "heal_aware" not in report:
            heal_aware_stage(model, calib["mix"], data, report, best["mix"])
            save()
    write_markdown(report, args.out.with_suffix(".md"))
    return 0


def heal_aware_spans(model, calib: torch.Tensor, width: int, ridge: float) -> list[dict]:
    """Every contiguous span of ``width`` blocks, scored by its calibration error after the best
    linear map (relative to ``‖h_j‖²``) and without one: a heal-aware selection, contiguous only."""
    n = model.config.num_hidden_layers
    runs = [(i, i + width) for i in range(1, n - width + 1)]
    dense = dense_capture(model, calib, runs)
    rows = []
    for i, j in runs:
        x, r, h = dense[("d", i - 1)], dense[("r", i - 1)], dense[("h", j)]
        y = h - r
        t = heal_math.fit_map(x, y, ridge=ridge)
        energy = float(h.double().pow(2).sum())
        rows.append({"span": [i, j],
                     "healed_rel_error": float(((x @ t.T) - y).double().pow(2).sum()) / energy,
                     "plain_rel_error": float((x - y).double().pow(2).sum()) / energy})
    return rows


def heal_aware_stage(model, calib, data, report, lam: float) -> None:
    """Choose the keep-0.75 span by healed error (on a quarter of the calibration windows);
    fit its map on all of them as the table's rows are fitted, and evaluate it."""
    width = len(PRUNED["0.75"])
    rows = heal_aware_spans(model, calib[::4], width, lam)
    best = min(rows, key=lambda row: row["healed_rel_error"])
    stage = {"spans": rows, "chosen": best["span"], "select_then_heal": [PRUNED["0.75"][0], PRUNED["0.75"][-1] + 1]}
    if best["span"] != stage["select_then_heal"]:
        pruned = list(range(*best["span"]))
        kept = [b for b in range(model.config.num_hidden_layers) if b not in set(pruned)]
        dense = dense_capture(model, calib, heal_math.pruned_runs(pruned))
        method = {"calib": "mix", "ridge": lam}
        transforms, shares = fit_runs(model, calib, pruned, dense, method)
        stage["final_ppl"] = {d: round(perplexity(model, data[d]["final"], kept, transforms), 3) for d in ALL_DOMAINS}
        stage["final_ppl_unhealed"] = {d: round(perplexity(model, data[d]["final"], kept, {}), 3) for d in ALL_DOMAINS}
    report["heal_aware"] = stage


def write_markdown(report: dict, path: Path) -> None:
    lines = ["Made by (in this order; the second resumed the first's rows and added the heal-aware stage): "
             + "; ".join(f"`{c}`" for c in report["commands"]), "",
             "Settings: " + json.dumps(report["settings"]), "",
             "Perplexity on the FINAL held-out parts (never used for a choice). "
             "geomean = geometric mean of healed/unhealed over the domains unlike calibration "
             f"({', '.join(UNLIKE)}); worst = largest single-domain change vs unhealed, all six domains.", "",
             "| keep | method | " + " | ".join(ALL_DOMAINS) + " | geomean ×unlike | worst domain | goals met |",
             "|---|---|" + "---|" * len(ALL_DOMAINS) + "---|---|---|"]
    for keep, rows in report["final"].items():
        base = rows["none"]["ppl"]
        for name, row in rows.items():
            ppl = row["ppl"]
            g = geomean_ratio(ppl, base, UNLIKE)
            worst, change = worst_change(ppl, base, ALL_DOMAINS)
            met = "-" if name == "none" else ("yes" if g <= 0.85 and change <= 0.02 else "no")
            lines.append(f"| {keep} | {name} | " + " | ".join(f"{ppl[d]:.1f}" for d in ALL_DOMAINS)
                         + f" | {g:.3f} | {worst} {change:+.1%} | {met} |")
    lines += ["", f"Ridge chosen on validation (unlike domains, worst keep): {report.get('chosen_ridge')}", ""]
    if "recipe_choice" in report:
        lines += [f"Opt-in recipe chosen on validation (no unlike domain > 2% worse at any keep, then lowest "
                  f"worst-keep geomean): {report['recipe_choice']}", ""]
    aware = report.get("heal_aware")
    if aware:
        ranked = sorted(aware["spans"], key=lambda row: row["healed_rel_error"])[:5]
        lines += ["Heal-aware selection (keep 0.75, contiguous spans only): calibration error after the best "
                  "linear map, relative to ‖h_j‖², best five:", "",
                  "| span | healed rel. error | plain rel. error |", "|---|---|---|"]
        lines += [f"| {r['span']} | {r['healed_rel_error']:.4f} | {r['plain_rel_error']:.4f} |" for r in ranked]
        lines += ["", f"Chosen {aware['chosen']}; select-then-heal prunes {aware['select_then_heal']}."]
        if "final_ppl" in aware:
            lines += [f"Chosen span healed, final parts: {aware['final_ppl']}; unhealed: {aware['final_ppl_unhealed']}."]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
