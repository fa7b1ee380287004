"""Quality of every block-selection method on one model (SmolLM2-135M by default).

For each row of ``ROWS`` and each keep ratio, the script plans (``make_plan``, timed,
with a fresh score cache per row and calibration seed so calibration is really paid
once), evaluates the pruned model (``vllm_miprun.evaluate``), and records:

- wiki and c4 perplexity (held-out split, ``--ppl-windows`` x ``--seq-len`` tokens);
- the zero-shot tasks' acc / acc_norm and their average acc_norm (``--limit`` examples each);
- stability: the mean pairwise Jaccard similarity of the pruned sets planned with
  ``--stability-seeds`` calibration seeds (methods that do not calibrate are skipped,
  except ``random``, whose seed is the calibration seed);
- calibration + selection seconds: the first plan of a row, which fills its empty cache
  (later ratios of the same row reuse the scores; their plan time is reported apart).

What is timed: planning only, wall clock, on this machine's CPUs (or ``--device``).
Model loading and evaluation time are recorded but are not the method's cost.

Outputs ``quality.json`` and ``quality_ppl.png`` (perplexity against keep ratio, one line
per method) in ``--out``:

    python benchmarks/bench_quality.py --backend vllm --limit 200 \\
        --out benchmarks/results/

vLLM starts its workers with spawn: everything runs under the ``__main__`` guard below.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_miprun import evaluate as ev  # noqa: E402
from vllm_miprun.cli import mean_pairwise_jaccard  # noqa: E402

logger = logging.getLogger("bench_quality")

RATIOS = (0.9, 0.8, 0.75, 0.6)
ZERO_SHOT = ev.MC_TASKS
# (row name, plan options without keep or None for the dense model, seeds). The lead owns this list.
ROWS: list[tuple[str, dict[str, Any] | None, tuple[int, ...]]] = [
    ("dense", None, (0,)),
    ("mi-prun", {"method": "mi-prun"}, (0,)),
    ("shortgpt", {"method": "shortgpt"}, (0,)),
    ("angular", {"method": "angular"}, (0,)),
    ("sleb", {"method": "sleb"}, (0,)),
    ("last", {"method": "last"}, (0,)),
    ("random", {"method": "random"}, (0, 1, 2)),
]


def timed_plan(model_dir: Path, options: dict[str, Any], cache_dir: Path):
    from vllm_miprun.blockwise import read_config
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.plan import make_plan

    start = time.perf_counter()
    plan = make_plan(model_dir, MiprunOptions.from_dict({**options, "cache_dir": str(cache_dir)}),
                     hf_config=read_config(model_dir), progress=False)
    return plan, time.perf_counter() - start


def run_row(args, name: str, base: dict[str, Any] | None, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    tasks = ["wiki-ppl", "c4-ppl"] + ([] if args.no_zero_shot else list(ZERO_SHOT))
    # Fewest kept first: a greedy search (SLEB) then caches every smaller drop on the way.
    ratios = (1.0,) if base is None else tuple(sorted(args.ratios))
    records = []
    for seed in seeds:
        cache_dir = args.cache_root  # shared by all rows: one calibration per seed, as in serving
        for ratio in ratios:
            record: dict[str, Any] = {"row": name, "keep": ratio, "seed": seed}
            prune = None
            if base is not None:
                options = {**base, "keep": ratio, "seed": seed}
                plan, seconds = timed_plan(args.model, options, cache_dir)
                record.update(kept=list(plan.kept), pruned=list(plan.pruned), plan_seconds=round(seconds, 3),
                              scores_source=plan.scores_source, **method_cost(plan, seconds))
                # vLLM plans again in the loader: same options and cache, so the same blocks
                prune = {**options, "cache_dir": str(cache_dir)} if args.backend == "vllm" else list(plan.kept)
            report = ev.evaluate(args.model, tasks, backend=args.backend, prune=prune, limit=args.limit,
                                 ppl_limit=args.ppl_windows, seed=args.seed, seq_len=args.seq_len,
                                 dtype=args.dtype, progress=True)
            if base is not None and report["kept"] != record["kept"]:
                raise RuntimeError(f"{name} keep={ratio}: served blocks {report['kept']} differ from "
                                   f"the plan's {record['kept']}")
            record["eval"] = report
            records.append(record)
            logger.info("%s keep=%.2f seed=%d wiki=%.3f c4=%.3f", name, ratio, seed,
                        report["tasks"]["wiki-ppl"]["ppl"], report["tasks"]["c4-ppl"]["ppl"])
    return records


def method_cost(plan, plan_seconds: float) -> dict[str, float]:
    """Calibration seconds (the score cache's own timing, paid once per model and seed) and
    selection seconds (this plan's wall time, minus calibration if it ran inside it)."""
    if plan.cache_path is None:
        return {"calibration_seconds": 0.0, "selection_seconds": round(plan_seconds, 3)}
    from vllm_miprun.cache import read_cache

    calibration = float(read_cache(plan.cache_path).timings.get("total_s", 0.0))
    selection = plan_seconds - (calibration if plan.scores_source == "computed" else 0.0)
    return {"calibration_seconds": round(calibration, 3), "selection_seconds": round(max(selection, 0.0), 3)}


def stability(args, base: dict[str, Any], name: str) -> dict[str, float | None]:
    """Mean pairwise Jaccard of the pruned sets over calibration seeds, at ``--stability-keep``."""
    if base["method"] in ("last",) or base["method"] in args.no_stability:
        return {}
    sets = []
    for seed in range(args.stability_seeds):
        plan, _ = timed_plan(args.model, {**base, "keep": args.stability_keep, "seed": seed}, args.cache_root)
        sets.append(set(plan.pruned))
    return {str(args.stability_keep): mean_pairwise_jaccard(sets)}


def markdown_table(records: list[dict[str, Any]], stable: dict[str, dict], keep_for_stability: float) -> str:
    """README table: one line per method and keep ratio (random: mean over its seeds)."""
    lines = ["| keep | method | wiki ppl | c4 ppl | zero-shot acc_norm | pruned | calibration s | selection s | "
             f"stability (Jaccard, keep {keep_for_stability}) |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["keep"], r["row"]), []).append(r)
    for (keep, row), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        def mean(get):
            values = [get(r) for r in rs if get(r) is not None]
            return sum(values) / len(values) if values else None
        wiki = mean(lambda r: r["eval"]["tasks"]["wiki-ppl"]["ppl"])
        c4 = mean(lambda r: r["eval"]["tasks"]["c4-ppl"]["ppl"])
        zs = mean(lambda r: r["eval"].get("mc_avg_acc_norm"))
        calib = mean(lambda r: r.get("calibration_seconds"))
        sel = mean(lambda r: r.get("selection_seconds"))
        pruned = "; ".join(",".join(map(str, r.get("pruned", []))) for r in rs) or "-"
        jac = stable.get(row, {}).get(str(keep_for_stability))
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {keep} | {row} | {fmt(wiki, '.1f')} | {fmt(c4, '.1f')} | {fmt(zs, '.3f')} | {pruned} | "
                     f"{fmt(calib, '.0f')} | {fmt(sel, '.0f')} | {fmt(jac, '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, task in zip(axes, ("wiki-ppl", "c4-ppl")):
        rows = sorted({r["row"] for r in records})
        for row in rows:
            points: dict[float, list[float]] = {}
            for r in records:
                if r["row"] == row:
                    points.setdefault(r["keep"], []).append(r["eval"]["tasks"][task]["ppl"])
            xs = sorted(points)
            ys = [sum(points[x]) / len(points[x]) for x in xs]  # random: mean over its seeds
            if row == "dense":
                axis.axhline(ys[0], color="black", linestyle="--", label="dense")
            else:
                axis.plot(xs, ys, marker="o", label=row)
        axis.set(xlabel="keep ratio", ylabel="perplexity", title=task, yscale="log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from vllm_miprun import assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: converted SmolLM2-135M)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of {[r[0] for r in ROWS]}")
    parser.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",")), default=RATIOS)
    parser.add_argument("--backend", choices=ev.BACKENDS, default="vllm")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default all)")
    parser.add_argument("--ppl-windows", type=int, default=ev.DEFAULT_PPL_WINDOWS)
    parser.add_argument("--seq-len", type=int, default=ev.DEFAULT_SEQ_LEN)
    parser.add_argument("--no-zero-shot", action="store_true", help="perplexity only")
    parser.add_argument("--stability-seeds", type=int, default=5)
    parser.add_argument("--stability-keep", type=float, default=0.75)
    parser.add_argument("--no-stability", default="", type=lambda s: tuple(filter(None, s.split(","))),
                        help="methods whose stability is not measured (e.g. sleb: a greedy search per seed)")
    parser.add_argument("--cache-root", type=Path, default=Path(tempfile.gettempdir()) / "miprun-quality-caches",
                        help="score caches shared by all rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zero-shot subsets")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.model = args.model or assets.prepare_smollm2()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = [r for r in ROWS if wanted is None or r[0] in wanted]

    records, stable = [], {}
    for name, base, seeds in rows:
        records += run_row(args, name, base, seeds)
        if base is not None and args.stability_seeds > 1:
            stable[name] = stability(args, base, name)
    result = {"model": str(args.model), "backend": args.backend, "ratios": list(args.ratios),
              "limit": args.limit, "ppl_windows": args.ppl_windows, "seq_len": args.seq_len,
              "dtype": args.dtype, "records": records, "stability": stable}
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    (args.out / "quality.md").write_text(markdown_table(records, stable, args.stability_keep))
    plot(records, args.out / "quality_ppl.png")
    logger.info("wrote %s and %s", args.out / "quality.json", args.out / "quality_ppl.png")


if __name__ == "__main__":
    main()
