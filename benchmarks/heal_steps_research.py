"""Healing research, third stage: does the KL-trained full map (``heal=distill``) hold at every
keep, and would fewer steps, or half the way from least squares, hold where 100 steps do not?

The product table (``quality_distill_smollm2``, final halves) found ``distill`` 2% or more
worse than unhealed on one unlike domain at one keep only: multilingual +3.7% at keep 0.8,
where ``linear`` (least squares) made multilingual better. A map trained less far from its
least-squares start may keep that domain. This stage measures, on the **validation** halves
of the four unlike domains only (the final halves are not read), on the planner's own sets
at every keep (the product table's):

- ``none`` and ``full lstsq`` (the least-squares start, ridge 0.01);
- ``kl@25``, ``kl@50``, ``kl@100``: the same single training run (the product's recipe: Adam,
  lr 2e-4, 2 windows a step, seed 0) read after 25, 50 and 100 steps (``kl@100`` is
  ``distill`` as shipped);
- ``half``: halfway from the least-squares map to ``kl@100`` (``T = (T_ls + T_kl) / 2``).

The rule, fixed before any figure was read: the variant for ``distill`` is the one with the
lowest validation geometric mean (healed / plain over the unlike domains, averaged in logs
over the keeps) among those with no unlike domain more than 2% worse than plain at any keep.
If ``kl@100`` is among them, nothing changes.

Run: ``PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_steps_research.py``
→ ``benchmarks/results/heal_steps_research.json`` (resumable, per keep) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heal_kl_research as kl  # noqa: E402
import heal_research as base  # noqa: E402


OUT = base.OUT / "heal_steps_research.json"
SETS_FROM = base.OUT / "quality_distill_smollm2.json"  # the planner's sets, as the product table used them
SNAPSHOTS = (25, 50, 100)
STEPS, LR = 100, 2e-4  # the product's DISTILL recipe for the full form
WORST = 0.02


def planner_sets(path: Path = SETS_FROM) -> dict[str, list[int]]:
    """MI-PRUN's pruned set at each keep of the product table."""
    records = json.loads(path.read_text())["records"]
    return {f"{r['keep']:g}": r["pruned"] for r in records if r["row"] == "mi-prun" and r["heal"] == "none"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--val-windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tok, model = kl.frozen_smollm2()
    val = {d: base.split_file_windows(tok, d, args.seq_len, args.val_windows, 0)["val"] for d in base.UNLIKE}
    calib = kl.calibration_mix(tok, args.calib_samples, args.calib_len)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report["command"] = ("PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/heal_steps_research.py "
                         + " ".join(argv or sys.argv[1:])).strip()
    report["settings"] = vars(args) | {"out": str(args.out), "snapshots": SNAPSHOTS, "steps": STEPS, "lr": LR}
    n = model.config.num_hidden_layers

    def ppl(pruned, maps):
        kept = [b for b in range(n) if b not in set(pruned)]
        with torch.inference_mode():
            return {d: round(base.perplexity(model, val[d], kept, maps), 3) for d in base.UNLIKE}

    for keep, pruned in planner_sets().items():
        if keep in report.get("keeps", {}):
            continue
        start_time = time.time()
        runs = base.heal_math.pruned_runs(pruned)
        with torch.inference_mode():
            dense = base.dense_capture(model, calib, runs)
            least_squares = base.fit_runs(model, calib, pruned, dense,
                                          {"calib": "mix", "form": "full", "ridge": kl.RIDGE_FULL})[0]
        snapshots: dict[int, dict] = {}

        def keep_snapshot(step: int, maps: dict) -> None:
            if step in SNAPSHOTS:
                snapshots[step] = maps

        kl.kl_fit(model, calib, pruned, least_squares, STEPS, 0.0, lr=LR, full=True, on_step=keep_snapshot)
        variants = {"none": {}, "full lstsq": least_squares}
        variants.update({f"kl@{step}": snapshots[step] for step in SNAPSHOTS})
        variants["half"] = {b: (least_squares[b] + snapshots[STEPS][b]) / 2 for b in least_squares}
        rows = {name: ppl(pruned, maps) for name, maps in variants.items()}
        report.setdefault("keeps", {})[keep] = {"pruned": pruned, "val": rows,
                                                "seconds": round(time.time() - start_time, 1)}
        print(keep, {name: round(base.geomean_ratio(p, rows["none"], base.UNLIKE), 3) for name, p in rows.items()},
              flush=True)
        base.save_report(report, args.out)
    report["choice"] = choose(report["keeps"])
    base.save_report(report, args.out)
    write_markdown(report, args.out.with_suffix(".md"))
    return 0


def effect(rows: dict, name: str) -> tuple[float, str, float]:
    """(geomean healed/plain over the unlike domains, worst domain, its change against plain)."""
    plain, healed = rows["none"], rows[name]
    return (base.geomean_ratio(healed, plain, base.UNLIKE), *base.worst_change(healed, plain, base.UNLIKE))


def choose(keeps: dict) -> dict:
    """The docstring's rule: lowest mean log-geomean among variants safe at every keep."""
    names = [name for name in next(iter(keeps.values()))["val"] if name != "none"]
    safe = [name for name in names if all(effect(k["val"], name)[2] <= WORST for k in keeps.values())]
    score = {name: sum(math.log(effect(k["val"], name)[0]) for k in keeps.values()) / len(keeps) for name in names}
    return {"safe": safe, "mean_log_geomean": {n: round(v, 4) for n, v in score.items()},
            "chosen": min(safe, key=score.get) if safe else None}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"Made by: `{report['command']}`", "",
             "Validation halves only. geomean = geometric mean of healed/unhealed perplexity over the unlike "
             "domains; worst = largest single-domain change against unhealed.", "",
             "| keep | variant | " + " | ".join(base.UNLIKE) + " | geomean ×plain | worst |",
             "|---|---|" + "---|" * (len(base.UNLIKE) + 2)]
    for keep, entry in report["keeps"].items():
        for name, p in entry["val"].items():
            geo, worst, change = effect(entry["val"], name)
            lines.append(f"| {keep} | {name} | " + " | ".join(f"{p[d]:.1f}" for d in base.UNLIKE)
                         + f" | {geo:.3f} | {worst} {change:+.1%} |")
    choice = report["choice"]
    lines += ["", f"Safe at every keep (no unlike domain more than {WORST:.0%} worse): "
              f"{', '.join(choice['safe']) or 'none'}. Chosen by the rule: {choice['chosen'] or 'none'}."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
