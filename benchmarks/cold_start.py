"""Cold start: how much longer a first miprun start takes than stock vLLM's, in calibration passes.

In one run, one after the other (never two at once: they would share the CPUs):

1. stock ``vllm serve MODEL`` (``vllm-miprun serve`` without miprun flags), timed from the
   command to ``/health`` answering 200;
2. one calibration-only forward pass: the full model over the calibration tokens a start
   calibrates on (the default settings: 32 windows of 256 wiki tokens), block by block as
   calibration runs it, without statistics; tokenising and building the model are reported
   apart. Its seconds are the unit of the target;
3. each cold miprun start (``--miprun-keep 0.75``, ``--miprun-latency-budget 0.8``,
   ``--miprun-quality-budget 1.3``, ``--miprun-keep 0.75 --miprun-heal linear``), each with a
   new empty ``MIPRUN_CACHE_DIR`` (no score cache, no stored selection, no heal maps), with
   the same flags, compile-cache state and KV memory as the stock start.

For each start: the excess over stock in calibration passes, and whether it meets the
target (excess <= ``--target`` passes; a target not met is reported as not met). Where the
time goes comes from the server's own report: ``miprun_plan_seconds`` and
``miprun_load_seconds`` from ``/metrics``, and the planner's log lines (calibration, each
forward search, each quality measurement, the heal fit, each with its seconds), read as
the server writes them.

With ``--check-plans`` it also checks that two speed-ups leave the plans unchanged on this
model: MI-PRUN's selection for keep 0.9, 0.8, 0.75, 0.6 and latency budgets 0.8 and 0.6,
searched once with one evaluator for all counts (a plan that searches several counts measures
each set once), once with a new evaluator per count (the code without it), and once per count
with a new evaluator resuming the deepest search's greedy order (what a score cache stores
for later plans).

    flock /tmp/miprun-engine.lock python benchmarks/cold_start.py --check-plans

Writes ``benchmarks/results/cold_start_smollm2.json`` and ``.png`` (25 min on a shared, about 15 on an idle
2-core CPU; ``--targets keep`` runs only the keep start).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_and_faults import logged_plan, parse_series, server_env, summed  # noqa: E402

from vllm_miprun.pipeline import store  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {
    "keep": ["--miprun-keep", "0.75"],
    "latency": ["--miprun-latency-budget", "0.8"],
    "quality": ["--miprun-quality-budget", "1.3"],
    "heal": ["--miprun-keep", "0.75", "--miprun-heal", "linear"],
}
# The planner's log lines that say how long a step took (pipeline/calibrate, plan, quality, heal).
STEPS = {
    "calibration_s": re.compile(r"calibrated in ([\d.]+) s"),
    "search_s": re.compile(r"searched \d+ blocks to prune in ([\d.]+) s"),
    "quality_s": re.compile(r"quality: measured \d+ pruned block\(s\) in ([\d.]+) s"),
    "heal_fit_s": re.compile(r"heal: fitted \d+ map\(s\) in ([\d.]+) s"),
}
CHECK_KEEPS = (0.9, 0.8, 0.75, 0.6)
CHECK_LATENCY_BUDGETS = ("0.8", "0.6")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--target", type=float, default=1.3, help="allowed excess over stock, in calibration passes")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--startup-timeout", type=float, default=1800)
    p.add_argument("--check-plans", action="store_true", help="also check plans with and without the shared "
                   "evaluator and the stored greedy order (keep 0.9/0.8/0.75/0.6, latency budgets 0.8/0.6)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. other load on the machine)")
    p.add_argument("--logs", default=None, help="folder for the server logs (default: a temporary folder)")
    p.add_argument("--out-json", default=str(RESULTS / "cold_start_smollm2.json"))
    p.add_argument("--out-png", default=str(RESULTS / "cold_start_smollm2.png"))
    args = p.parse_args(argv)
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        p.error(f"--targets takes {', '.join(TARGETS)}, got {', '.join(sorted(unknown))}")
    return args


class LoggedServer:
    """A server whose output lines are written to ``log`` and kept with their arrival time."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.started = time.monotonic()
        self.proc = harness.start_in_own_group(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as out:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
                out.write(line)
                out.flush()

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def start_and_time(name: str, miprun_flags: list[str], args, model: Path, logs: Path) -> dict:
    """Start one server with an empty cache folder, time it to /health, read its report, stop it."""
    cache_dir = Path(tempfile.mkdtemp(prefix=f"cold-{name}-"))
    port = harness.free_port()
    argv = [sys.executable, "-m", "vllm_miprun.tools.cli", "serve", str(model), "--host", harness.LOCALHOST,
            "--port", str(port), "--dtype", args.dtype, "--enforce-eager", "--seed", "0",
            "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)), "--max-model-len", "512",
            *miprun_flags]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv[3:])}", flush=True)
    server = LoggedServer(argv, server_env(cache_dir), logs / f"{name}.log")
    try:
        start_s = harness.wait_healthy(server.proc, port, args.startup_timeout, lambda: server.text()[-4000:])
        metrics = summed(parse_series(harness.http_get(f"http://{harness.LOCALHOST}:{port}/metrics", timeout=10)[1]))
    finally:
        harness.stop_group(server.proc)
        server._reader.join(timeout=30)
    row = {"start": name, "flags": miprun_flags, "start_s": round(start_s, 2), "cache_dir_empty_at_start": True}
    if miprun_flags:
        row.update(breakdown(server.text(), metrics))
    print(f"  {name}: healthy after {start_s:.1f} s", flush=True)
    return row


def breakdown(log_text: str, metrics: dict[str, float]) -> dict:
    """Where a miprun start's time went: the plan's steps (from the log) and the server's report."""
    steps = {key: round(sum(float(v) for v in pattern.findall(log_text)), 2) for key, pattern in STEPS.items()}
    steps["searches"] = len(STEPS["search_s"].findall(log_text))
    steps["quality_measurements"] = len(STEPS["quality_s"].findall(log_text))
    plan_s = metrics.get("miprun_plan_seconds")
    load_s = metrics.get("miprun_load_seconds")
    named = sum(steps[key] for key in STEPS)
    return {"plan": logged_plan(log_text), "plan_s": plan_s, "load_s": load_s, "steps": steps,
            "plan_other_s": round(plan_s - named, 2) if plan_s is not None else None}


def calibration_pass(model: Path) -> dict:
    """Seconds of one forward pass of the full model over the default calibration tokens."""
    import torch

    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibration_ids

    settings = MiprunOptions.from_dict({"keep": 0.75}).calibration  # what a start calibrates on
    begin = time.perf_counter()
    ids = calibration_ids(model, settings)
    tokenised = time.perf_counter()
    blockwise = BlockwiseModel(model, device="cpu")
    built = time.perf_counter()
    with torch.inference_mode():
        hidden = blockwise.embed_tokens(ids)
        for index in range(blockwise.num_blocks):
            with blockwise.block(index) as layer:
                hidden = blockwise.run_block(layer, hidden)
    done = time.perf_counter()
    return {"tokens": int(ids.numel()), "windows": int(ids.shape[0]), "settings": settings.to_json(),
            "forward_s": round(done - built, 2), "tokenise_s": round(tokenised - begin, 2),
            "build_model_s": round(built - tokenised, 2)}


def check_plans(model: Path) -> dict:
    """MI-PRUN's sets for keep 0.9/0.8/0.75/0.6 and latency budgets 0.8/0.6 with one shared
    evaluator (largest count first, as a bisection goes), with a new evaluator per count, and
    with a new evaluator per count given the largest count's greedy order (``refine``'s ``known``)."""
    from vllm_miprun.core.latency import LatencyModel
    from vllm_miprun.core.selection import prune_count
    from vllm_miprun.core.selection.dispatch import max_keep_for_budget
    from vllm_miprun.core.span_cost import span_cost_matrix
    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibrate, calibration_ids
    from vllm_miprun.pipeline.forward_search import FORWARD_MAX_SAMPLES, MI_PRUN_BOUND_SAMPLES
    from vllm_miprun.pipeline.refine import CalibrationKL, refine

    settings = MiprunOptions.from_dict({"keep": 0.75}).calibration
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = calibrate(model, settings, cache_dir=cache_dir, progress=False).cache
    config = read_config(model)
    num_blocks = int(config["num_hidden_layers"])
    latency = LatencyModel.from_config(config)  # what an empty cache folder plans with
    counts = {f"keep {k}": prune_count(k, num_blocks) for k in CHECK_KEEPS}
    for budget in CHECK_LATENCY_BUDGETS:  # the latency model alone sets the count (identical blocks)
        keep = max_keep_for_budget(latency, _budget_seconds(latency, budget))
        if keep > 0:  # else the budget is below the floor: no plan to compare
            counts[f"latency budget {budget}"] = num_blocks - keep
    cost = span_cost_matrix(cache)
    blockwise = BlockwiseModel(model, resident_blocks=True)
    ids = calibration_ids(model, settings)[:FORWARD_MAX_SAMPLES][:MI_PRUN_BOUND_SAMPLES]
    rows, shared, fresh_s = {}, CalibrationKL(blockwise, ids), 0.0
    begin = time.perf_counter()
    for name in sorted(counts, key=lambda n: -counts[n]):
        rows[name] = {"num_prune": counts[name],
                      "shared": list(refine(model, ids, cost, counts[name], model=blockwise, evaluator=shared).pruned)}
    shared_s = time.perf_counter() - begin
    deepest = refine(model, ids, cost, max(counts.values()), model=blockwise, evaluator=shared)
    order = [step["block"] for step in deepest.details["greedy_trace"]]  # what a score cache stores
    resumed_s = 0.0
    for name in rows:
        begin = time.perf_counter()
        rows[name]["separate"] = list(refine(model, ids, cost, counts[name], model=blockwise).pruned)
        fresh_s += time.perf_counter() - begin
        begin = time.perf_counter()
        rows[name]["resumed"] = list(refine(model, ids, cost, counts[name], model=blockwise, known=order).pruned)
        resumed_s += time.perf_counter() - begin
        rows[name]["agree"] = rows[name]["shared"] == rows[name]["separate"] == rows[name]["resumed"]
    return {"sets": rows, "all_agree": all(row["agree"] for row in rows.values()),
            "shared_evaluator_s": round(shared_s, 1), "separate_evaluators_s": round(fresh_s, 1),
            "resumed_from_stored_order_s": round(resumed_s, 1)}


def _budget_seconds(latency, budget: str) -> float:
    from vllm_miprun.core.latency import parse_latency_budget

    return latency.budget_seconds(parse_latency_budget(budget))


def summarise(stock: dict, unit_s: float, starts: list[dict], target: float) -> list[dict]:
    for row in starts:
        excess = row["start_s"] - stock["start_s"]
        row["excess_over_stock_s"] = round(excess, 2)
        row["excess_in_calibration_passes"] = round(excess / unit_s, 2)
        row["target_met"] = excess <= target * unit_s
    return starts


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = result["stock"]["start_s"]
    rows = [result["stock"], *result["starts"]]
    colours = {"calibration_s": "tab:blue", "search_s": "tab:orange", "quality_s": "tab:green",
               "heal_fit_s": "tab:red", "plan_other_s": "tab:purple"}
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(rows) + 1.5))
    for y, row in enumerate(rows):
        steps = {**row.get("steps", {}), "plan_other_s": row.get("plan_other_s") or 0.0}
        planned = sum(steps.get(key, 0.0) for key in colours)
        ax.barh(y, row["start_s"] - planned, color="0.7", label="vLLM start and load" if y == 0 else None)
        left = row["start_s"] - planned
        for key, colour in colours.items():
            value = steps.get(key, 0.0)
            if value:
                ax.barh(y, value, left=left, color=colour, label=key.removesuffix("_s").replace("_", " ")
                        if key not in ax.get_legend_handles_labels()[1] else None)
                left += value
    limit = stock + result["target_passes"] * result["calibration_pass"]["forward_s"]
    ax.axvline(limit, color="black", linestyle="--", label=f"target: stock + {result['target_passes']:g} "
               "calibration passes")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.set_yticks(range(len(rows)), [row["start"] for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds to /health (cold: empty score cache)")
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = Path(args.model).resolve() if args.model else harness.default_model_dir()
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="miprun-cold-start-"))
    logs.mkdir(parents=True, exist_ok=True)
    stock = start_and_time("stock", [], args, model, logs)
    print(f"[{time.strftime('%H:%M:%S')}] calibration pass", flush=True)
    unit = calibration_pass(model)
    print(f"  {unit['forward_s']} s over {unit['tokens']} tokens", flush=True)
    starts = [start_and_time(name, TARGETS[name], args, model, logs) for name in args.targets.split(",")]
    result = harness.stamp({
        "benchmark": "benchmarks/cold_start.py",
        "command": "python " + " ".join(["benchmarks/cold_start.py", *sys.argv[1:]]),
        "model": model.name, "dtype": args.dtype, "kv_cache_gib": args.kv_cache_gib,
        "note": args.note,
        "timed": "each start from the command to /health answering 200; the calibration pass is one forward "
                 "pass of the full model over the default calibration tokens (block by block, no statistics)",
        "target_passes": args.target,
        "stock": stock, "calibration_pass": unit,
        "starts": summarise(stock, unit["forward_s"], starts, args.target),
        "where": "steps from the planner's log lines; plan_s and load_s from /metrics (miprun_plan_seconds "
                 "includes the heal fit, done in the front process); plan_other_s: plan_s minus the named "
                 "steps (model and tokenizer reads, fingerprint, selection bookkeeping)",
    })
    if args.check_plans:
        print(f"[{time.strftime('%H:%M:%S')}] plans with and without the shared evaluator", flush=True)
        result["plan_check"] = check_plans(model)
        served = {"keep": "keep 0.75", "latency": "latency budget 0.8"}
        result["plan_check"]["servers_agree"] = {
            served[row["start"]]: row["plan"]["pruned"] == result["plan_check"]["sets"][served[row["start"]]]["shared"]
            for row in starts if row["start"] in served and row.get("plan")}
    store.atomic_write_text(Path(args.out_json), json.dumps(result, indent=1) + "\n")
    plot(result, args.out_png)
    print(f"wrote {args.out_json} and {args.out_png}")
    print(f"stock {stock['start_s']:.1f} s; calibration pass {unit['forward_s']:.1f} s")
    for row in result["starts"]:
        print(f"{row['start']:8s} {row['start_s']:7.1f} s  excess {row['excess_in_calibration_passes']:5.2f} passes "
              f"({'met' if row['target_met'] else 'NOT met'})  plan {row['plan_s']} s  steps {row['steps']}")
    if args.check_plans:
        print("plans agree:", result["plan_check"]["all_agree"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
