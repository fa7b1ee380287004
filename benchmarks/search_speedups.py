"""Forward-search speed-ups against the code without them, in one run, with the same plans.

MI-PRUN's default search and SLEB measure hundreds of pruned models on calibration tokens.
Each measurement resumes from stored boundary states (a few chains of them) and runs the
blocks past the first difference, re-reading each block from disk (on the CPU no block stays
resident between passes). Two changes make that cheaper without changing a single number the
search sees:

* **direct block assignment** (``BlockwiseModel._load_block``): once transformers' loader was
  seen to take a block layout as stored (same names, shapes and dtypes, nothing copied), later
  blocks of that layout are assigned directly instead of going through the loader, which walks
  the whole model's state dict on every call;
* **least-recently-used chains** (``CalibrationCE._touch``): stored chains are evicted least
  recently used first instead of first in, first out, so a round's base set and winner stay.

For each search (MI-PRUN's at keep 0.75 and 0.6, SLEB's at keep 0.9, from the calibration
scores of the default settings), each variant runs on a new model and a new evaluator, the
two variants one after the other in alternating order: seconds of the search (the full pass,
every measurement, the LM head and the KL included; calibration excluded), block passes,
block loads and how many of those were direct assignments. The blocks chosen must be the
same. Ratios are shipped / without. Beforehand, the milliseconds to load and release one
block with each variant (every block, 5 rounds after a warm-up).

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/search_speedups.py

Writes ``benchmarks/results/search_speedups_smollm2.json`` and ``.png`` (about 10 minutes on
an idle 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.pipeline import store  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEARCHES = (("mi-prun", 0.75), ("mi-prun", 0.6), ("sleb", 0.9))


def without_speedups() -> ExitStack:
    """The search as it was before the two changes: every block through transformers' loader,
    stored chains evicted in arrival order."""
    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.pipeline.refine import CalibrationCE

    def through_loader(self, layer, index, tensors):
        self._materialise(layer, tensors)

    stack = ExitStack()
    stack.enter_context(mock.patch.object(BlockwiseModel, "_load_block", through_loader))
    stack.enter_context(mock.patch.object(CalibrationCE, "_touch", lambda self, pruned: None))
    return stack


def run_search(model_dir: Path, method: str, num_prune: int, cost, ids) -> dict:
    """One search on a new model and evaluator; what it chose and what it cost."""
    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.pipeline.forward_search import MI_PRUN_BOUND_SAMPLES
    from vllm_miprun.pipeline.refine import refine, sleb

    model = BlockwiseModel(model_dir, resident_blocks=True)  # the planner's model: on the CPU, budget 0
    start = time.perf_counter()
    if method == "mi-prun":
        result = refine(model_dir, ids[:MI_PRUN_BOUND_SAMPLES], cost, num_prune, model=model)
    else:
        result = sleb(model, ids, num_prune)
    seconds = time.perf_counter() - start
    return {"pruned": list(result.pruned), "seconds": round(seconds, 2), "block_passes": result.details["block_passes"],
            "blocks_loaded": model.blocks_loaded, "blocks_assigned": model.blocks_assigned}


def reload_ms(model_dir: Path, rounds: int = 5) -> float:
    """Milliseconds to load and release one block (read, cast, load, drop), over every block
    ``rounds`` times after a warm-up round; the page cache holds the checkpoint."""
    from vllm_miprun.model.blockwise import BlockwiseModel

    model = BlockwiseModel(model_dir)
    for index in range(model.num_blocks):  # warm-up: the first block of a layout takes the loader
        with model.block(index):
            pass
    start = time.perf_counter()
    for _ in range(rounds):
        for index in range(model.num_blocks):
            with model.block(index):
                pass
    return round((time.perf_counter() - start) / (rounds * model.num_blocks) * 1e3, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M)")
    p.add_argument("--cache-dir", default=None, help="score cache folder (default $MIPRUN_CACHE_DIR)")
    p.add_argument("--out-json", default=str(RESULTS / "search_speedups_smollm2.json"))
    p.add_argument("--out-png", default=str(RESULTS / "search_speedups_smollm2.png"))
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. other load on the machine)")
    args = p.parse_args(argv)

    from vllm_miprun.core.selection import prune_count
    from vllm_miprun.core.span_cost import span_cost_matrix
    from vllm_miprun.options import CalibrationSettings
    from vllm_miprun.pipeline.calibrate import calibrate, calibration_ids
    from vllm_miprun.pipeline.forward_search import FORWARD_MAX_SAMPLES

    model_dir = Path(args.model).resolve() if args.model else harness.default_model_dir()
    settings = CalibrationSettings()
    cache = calibrate(model_dir, settings, cache_dir=args.cache_dir, progress=True).cache
    cost, ids = span_cost_matrix(cache), calibration_ids(model_dir, settings)[:FORWARD_MAX_SAMPLES]
    num_blocks = cost.shape[0] - 1
    reload = {}
    for variant in ("without", "shipped"):
        with ExitStack() as stack:
            if variant == "without":
                stack.enter_context(without_speedups())
            reload[variant] = reload_ms(model_dir)
    print(f"block re-load: {reload} ms", flush=True)
    rows = []
    for turn, (method, keep) in enumerate(SEARCHES):
        num_prune = prune_count(keep, num_blocks)
        row = {"method": method, "keep": keep, "num_prune": num_prune}
        order = ("shipped", "without") if turn % 2 == 0 else ("without", "shipped")
        for variant in order:
            print(f"[{time.strftime('%H:%M:%S')}] {method} keep {keep}: {variant}", flush=True)
            with ExitStack() as stack:
                if variant == "without":
                    stack.enter_context(without_speedups())
                row[variant] = run_search(model_dir, method, num_prune, cost, ids)
            print(f"  {row[variant]}", flush=True)
        shipped, before = row["shipped"], row["without"]
        row["same_blocks"] = shipped["pruned"] == before["pruned"]
        row["seconds_ratio"] = round(shipped["seconds"] / before["seconds"], 3)
        row["block_passes_ratio"] = round(shipped["block_passes"] / before["block_passes"], 3)
        rows.append(row)
    result = harness.stamp({
        "benchmark": "benchmarks/search_speedups.py", "model": model_dir.name, "note": args.note,
        "timed": "each search from a new model and evaluator to its answer: the full pass, every measurement, "
                 "block re-loads, the LM head and the objective; calibration (cached scores) excluded",
        "variants": {"shipped": "direct block assignment and least-recently-used chains",
                     "without": "every block through transformers' loader; chains evicted first in, first out"},
        "block_reload_ms": reload, "searches": rows, "all_same_blocks": all(r["same_blocks"] for r in rows),
    })
    store.atomic_write_text(Path(args.out_json), json.dumps(result, indent=1) + "\n")
    plot(rows, args.out_png)
    for r in rows:
        print(f"{r['method']:8s} keep {r['keep']}: {r['without']['seconds']:7.1f} s -> {r['shipped']['seconds']:7.1f} s "
              f"(x{r['seconds_ratio']}), passes x{r['block_passes_ratio']}, same blocks {r['same_blocks']}")
    print(f"wrote {args.out_json} and {args.out_png}")
    return 0 if result["all_same_blocks"] else 1


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\nkeep {r['keep']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, variant, colour in ((-width / 2, "without", "0.6"), (width / 2, "shipped", "tab:blue")):
        xs = [i + offset for i in range(len(rows))]
        bars = ax.bar(xs, [r[variant]["seconds"] for r in rows], width, color=colour, label=variant)
        if variant == "shipped":
            ax.bar_label(bars, [f"x{r['seconds_ratio']:.2f}" for r in rows], fontsize=8)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("search seconds (calibration excluded)")
    ax.set_title("Forward searches with and without the speed-ups (same blocks chosen)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
