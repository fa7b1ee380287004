"""A first plan's time, the default (MI-PRUN) against SLEB, at each keep ratio, in one run.

The goal: the default plans in at most 1/5 of SLEB's time. Both sides are timed as a user
meets them, on the same machine in one process, after a warm-up (not timed) that pays the
process's one-time costs, imports and first kernel calls, so neither side carries them:

* **MI-PRUN**: ``make_plan`` from an empty score cache folder for each keep, as a first
  ``vllm-miprun plan`` or a first ``vllm serve`` does: calibration (tokenisation, one
  block-by-block pass with statistics, the span MI) and then the forward search (2 × 256
  calibration tokens). The calibration share is the score cache's own ``total_s``. Each
  keep is planned ``--repeats`` times (3), each from an empty folder, and the run of median
  seconds is reported: a plan of 10-45 s moves with the machine by 10% and more from one run
  to the next, while SLEB's one run of minutes averages over that.
* **ShortGPT** (for reference, the cheapest method that reads scores): the same, its
  selection a ranking of the scores.
* **SLEB**: one search at the smallest keep, through the planner's own forward search
  (``ForwardSearch.run``: model, tokenisation, the full pass, the greedy on 4 × 256 tokens;
  SLEB reads no score cache). SLEB's plan for a smaller count runs exactly the first rounds
  of that greedy, the same evaluations in the same order, so its time is the run's time less
  the later rounds (each round's end is in the trace, ``refine.sleb``). Its chosen sets are
  the trace's prefixes.

Ratios are MI-PRUN / SLEB, with calibration (a first plan) and without it (scores computed
ahead of time, e.g. by ``python -m calibration.run``).

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/plan_time.py

Writes ``benchmarks/results/plan_time_smollm2.json`` and ``.png`` (about 12 minutes on an
idle 2-core Intel Xeon, a third of it SLEB at keep 0.6).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.pipeline import store  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEEPS = (0.9, 0.8, 0.75, 0.6)
TARGET_RATIO = 0.2


def warm_up(model_dir: Path) -> float:
    """Pay the process's one-time costs before anything is timed: the tokenizer's and the
    model classes' imports and the first calls of each kernel. Whichever side ran first would
    otherwise carry them alone (before this, MI-PRUN's keep-0.9 plan ran first and its
    calibration took 31.5 s against 25-27 s at every other keep). Seconds, for the JSON."""
    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibration_ids

    start = time.perf_counter()
    ids = calibration_ids(model_dir, MiprunOptions(keep=1.0).calibration)[:2]
    model = BlockwiseModel(model_dir)
    model.token_logprobs(model.forward_from(model.embed_tokens(ids), 0))
    return time.perf_counter() - start


def first_plan(model_dir: Path, keep: float, method: str = "mi-prun") -> dict:
    """A plan from an empty score cache: seconds, and the calibration's share."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    with tempfile.TemporaryDirectory(prefix="miprun-plan-time-") as cache_dir:
        start = time.perf_counter()
        plan = make_plan(model_dir, MiprunOptions(keep=keep, method=method, cache_dir=cache_dir), progress=False)
        seconds = time.perf_counter() - start
        calibration = float(store.read_cache(Path(plan.cache_path)).timings["total_s"])
    return {"pruned": list(plan.pruned), "seconds": round(seconds, 2), "calibration_s": round(calibration, 2),
            "search_s": round(seconds - calibration, 2)}


def median_first_plan(model_dir: Path, keep: float, method: str, repeats: int) -> dict:
    """The first plan of median seconds among ``repeats``, each from its own empty folder, with
    every run's seconds (``samples``). One short plan moves with the machine by 10% and more
    from one run to the next; SLEB's one long run averages over minutes. Every run must give
    the same set."""
    runs = [first_plan(model_dir, keep, method) for _ in range(repeats)]
    if len({tuple(run["pruned"]) for run in runs}) != 1:
        raise RuntimeError(f"{method} at keep {keep} gave different sets from run to run: {runs}")
    median = sorted(runs, key=lambda run: run["seconds"])[(repeats - 1) // 2]
    return {**median, "samples": [run["seconds"] for run in runs]}


def sleb_run(model_dir: Path, keep: float, num_blocks: int, num_prune: int) -> tuple[float, list[dict]]:
    """SLEB's search for ``num_prune`` blocks as the planner runs it: seconds and greedy trace."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.forward_search import ForwardSearch

    search = ForwardSearch(model_dir, MiprunOptions(keep=keep, method="sleb"), cost=None)
    start = time.perf_counter()
    result = search.run("sleb", num_blocks, num_prune, frozenset())
    return time.perf_counter() - start, result.details["trace"]


def sleb_seconds_by_count(total: float, trace: list[dict]) -> dict[int, dict]:
    """SLEB's plan time for every count of its trace: ``total`` less the rounds after it."""
    last = trace[-1]["seconds"]
    return {len(step["pruned"]): {"pruned": step["pruned"], "seconds": round(total - (last - step["seconds"]), 2)}
            for step in trace}


def compare(keeps, num_blocks: int, mi_prun: dict, sleb: dict, shortgpt: dict) -> list[dict]:
    from vllm_miprun.core.selection import prune_count

    rows = []
    for keep in keeps:
        num_prune = prune_count(keep, num_blocks)
        ours, theirs = mi_prun[keep], sleb[num_prune]
        first, scored = ours["seconds"] / theirs["seconds"], ours["search_s"] / theirs["seconds"]
        rows.append({"keep": keep, "num_prune": num_prune, "mi_prun": ours, "sleb": theirs, "shortgpt": shortgpt[keep],
                     "ratio_first_plan": round(first, 3), "ratio_scores_cached": round(scored, 3),
                     "target_met_first_plan": first <= TARGET_RATIO,
                     "target_met_scores_cached": scored <= TARGET_RATIO})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M)")
    p.add_argument("--keeps", type=lambda v: tuple(float(x) for x in v.split(",")), default=KEEPS)
    p.add_argument("--out-json", default=str(RESULTS / "plan_time_smollm2.json"))
    p.add_argument("--out-png", default=str(RESULTS / "plan_time_smollm2.png"))
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. other load on the machine)")
    p.add_argument("--repeats", type=int, default=3, help="first plans per method and keep; the median is reported")
    args = p.parse_args(argv)

    from vllm_miprun.core.selection import prune_count
    from vllm_miprun.model.checkpoint import read_config

    model_dir = Path(args.model).resolve() if args.model else harness.default_model_dir()
    num_blocks = int(read_config(model_dir)["num_hidden_layers"])
    warm_up_s = warm_up(model_dir)
    print(f"[{time.strftime('%H:%M:%S')}] warm-up (not timed as either side): {warm_up_s:.1f} s", flush=True)
    mi_prun, shortgpt = {}, {}
    for keep in args.keeps:
        for method, found in (("mi-prun", mi_prun), ("shortgpt", shortgpt)):
            print(f"[{time.strftime('%H:%M:%S')}] {method} keep {keep}: {args.repeats} first plans", flush=True)
            found[keep] = median_first_plan(model_dir, keep, method, args.repeats)
            print(f"  {found[keep]}", flush=True)
    deepest = max(prune_count(keep, num_blocks) for keep in args.keeps)
    print(f"[{time.strftime('%H:%M:%S')}] sleb: {deepest} blocks", flush=True)
    total, trace = sleb_run(model_dir, min(args.keeps), num_blocks, deepest)
    sleb = sleb_seconds_by_count(total, trace)
    rows = compare(args.keeps, num_blocks, mi_prun, sleb, shortgpt)
    result = harness.stamp({
        "benchmark": "benchmarks/plan_time.py", "model": model_dir.name, "note": args.note,
        "target_ratio": TARGET_RATIO,
        "timed": "MI-PRUN and ShortGPT: make_plan from an empty score cache folder per keep (calibration + "
                 "search; calibration_s is the cache's total_s; ShortGPT only ranks), repeated, the run of median "
                 "seconds reported (samples: every run's seconds). SLEB: one ForwardSearch.run "
                 "at the smallest keep (model, tokenisation, full pass, greedy); a smaller count's time is that "
                 "run less its later rounds. Before either: a warm-up (tokenizer, model classes, one forward pass of "
                 "2 windows) so that neither side pays the process's one-time costs",
        "warm_up_s": round(warm_up_s, 2), "repeats": args.repeats,
        "sleb_run_s": round(total, 2), "sleb_trace": trace, "rows": rows,
    })
    store.atomic_write_text(Path(args.out_json), json.dumps(result, indent=1) + "\n")
    plot(rows, args.out_png)
    for r in rows:
        print(f"keep {r['keep']}: mi-prun {r['mi_prun']['seconds']:6.1f} s ({r['mi_prun']['search_s']:.1f} s search), "
              f"sleb {r['sleb']['seconds']:6.1f} s: x{r['ratio_first_plan']} first plan, "
              f"x{r['ratio_scores_cached']} scores cached (target <= {TARGET_RATIO})")
    print(f"wrote {args.out_json} and {args.out_png}")
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(rows))
    calibration = [r["mi_prun"]["calibration_s"] for r in rows]
    ax.bar([x - width / 2 for x in xs], calibration, width, color="tab:cyan", label="MI-PRUN calibration")
    bars = ax.bar([x - width / 2 for x in xs], [r["mi_prun"]["search_s"] for r in rows], width,
                  bottom=calibration, color="tab:blue", label="MI-PRUN search")
    ax.bar_label(bars, [f"x{r['ratio_first_plan']:.2f}" for r in rows], fontsize=8)
    ax.bar([x + width / 2 for x in xs], [r["sleb"]["seconds"] for r in rows], width, color="0.6", label="SLEB")
    ax.set_xticks(list(xs), [f"keep {r['keep']}\n({r['num_prune']} pruned)" for r in rows])
    ax.set_ylabel("seconds to a first plan")
    ax.set_title(f"First plan: MI-PRUN / SLEB (labels; target <= {TARGET_RATIO})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
