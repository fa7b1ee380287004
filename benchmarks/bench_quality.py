"""Quality of every block-selection method on one model (SmolLM2-135M by default).

For each row of ``ROWS`` and each keep ratio, the script plans (``make_plan``, timed;
all rows share one score cache folder, empty at the start, so each calibration seed's
forward pass is paid once, as in serving), evaluates the pruned model
(``vllm_miprun.tools.evaluate``), and records:

- wiki and c4 perplexity (held-out split, ``--ppl-windows`` x ``--seq-len`` tokens);
- the zero-shot tasks' acc / acc_norm and their average acc_norm (``--limit`` seeded
  examples each); two rows that keep the same blocks are the same model and are
  evaluated once;
- generation (``--gen-tasks``, ``tools/eval_generate.py``): greedy agreement with the
  dense model (mean matching prefix of 32 greedy tokens on 32 held-out wiki prompts, and
  the share matching in full; the dense continuations are decoded once per run) and
  LAMBADA exact match (64 seeded passages, the last word written greedily);
- stability: the mean pairwise Jaccard similarity of the pruned sets planned with
  ``--stability-seeds`` calibration seeds at each of ``--stability-keeps`` (``last`` is
  deterministic; ``random``'s seed is the calibration seed; ``--no-stability`` skips rows);
- calibration and selection seconds (see ``TIMED``). SLEB's deepest run caches every
  shallower answer (greedy prefixes); the shallower ones are charged a prorated share.

What is timed: planning only, wall clock, on this machine's CPUs (or ``--device``).
Model loading and evaluation time are recorded but are not the method's cost.

Outputs, after every row, ``<name>.json``, ``<name>.md`` (the table and the goals of
issue 6, each met or not) and ``<name>_ppl.png`` (perplexity against keep ratio, one
line per method) in ``--out``. One command produces every SmolLM2 row:

    python benchmarks/bench_quality.py --backend transformers --limit 20 --ppl-windows 8 \
        --no-stability sleb,mi-prun-renyi

``--rows ... [--ratios ...] --merge`` redoes some (row, keep) pairs and keeps the others of
the existing JSON (same settings only); the JSON's ``commands`` says which command produced
which ``row@keep``. The file is re-read under a lock at every write, so two ``--merge`` runs
with different rows may share one file.

``--add-gen`` runs only ``--gen-tasks`` on the pruned sets an existing ``<name>.json``
records (no planning, nothing else recomputed) and writes them into its records:

    python benchmarks/bench_quality.py --backend transformers --limit 20 --ppl-windows 8 \
        --add-gen --rows dense,mi-prun,sleb,shortgpt --ratios 0.9,0.75,0.6

With ``--heal MODE`` it also takes the records healed with ``MODE``: their maps are read from
``--cache-root`` (the table's run stored them there), or fitted again when they are not there.

``--heal [linear|distill]`` evaluates every pruned set twice, plain and healed (the maps are
fitted once per set and stored beside the score cache), on every perplexity domain
(``--ppl-tasks ppl``: the calibration domains wiki and c4, and the evaluation-only domains
unlike them), and writes issue 16's table and goals instead (``heal_table.py``):

    python benchmarks/bench_quality.py --backend transformers --limit 20 --ppl-windows 8 \
        --heal --ppl-tasks ppl --stability-seeds 1 --name quality_heal_smollm2

(the transformers backend deletes the same blocks; ``tests/test_evaluate.py`` checks
that it agrees with vLLM request by request). vLLM starts its workers with spawn:
everything runs under the ``__main__`` guard below.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen_table  # noqa: E402
import heal_table  # noqa: E402

from vllm_miprun.pipeline.store import atomic_write_text  # noqa: E402
from vllm_miprun.tools import evaluate as ev  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402
from vllm_miprun.tools.cli import mean_pairwise_jaccard  # noqa: E402

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
    ("mi-prun-renyi", {"method": "mi-prun", "estimator": "renyi"}, (0,)),
]
ONE_SHOT = ("shortgpt", "angular", "last")  # the goals compare MI-PRUN with the best of these
PLOT_CAP = 1e4  # top of the perplexity plot's axis


def timed_plan(model_dir: Path, options: dict[str, Any], cache_dir: Path):
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    start = time.perf_counter()
    plan = make_plan(model_dir, MiprunOptions.from_dict({**options, "cache_dir": str(cache_dir)}),
                     hf_config=read_config(model_dir), progress=False)
    return plan, time.perf_counter() - start


def run_row(args, name: str, base: dict[str, Any] | None, seeds: tuple[int, ...],
            evaluated: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    tasks = list(args.ppl_tasks) + ([] if args.no_zero_shot else list(ZERO_SHOT)) + list(args.gen_tasks)
    # Fewest kept first: a greedy search (SLEB) then caches every smaller drop on the way.
    ratios = (1.0,) if base is None else tuple(sorted(args.ratios))
    records = []
    for seed in seeds:
        cache_dir = args.cache_root  # shared by all rows: one calibration per seed, as in serving
        for ratio in ratios:
            record: dict[str, Any] = {"row": name, "keep": ratio, "seed": seed, "heal": "none"}
            prune = options = None
            if base is not None:
                options = {**base, "keep": ratio, "seed": seed}
                plan, seconds = timed_plan(args.model, options, cache_dir)
                record.update(kept=list(plan.kept), pruned=list(plan.pruned), plan_seconds=round(seconds, 3),
                              scores_source=plan.scores_source, **method_cost(plan, seconds))
                # vLLM plans again in the loader: same options and cache, so the same blocks
                prune = {**options, "cache_dir": str(cache_dir)} if args.backend == "vllm" else list(plan.kept)
            # Two methods that keep the same blocks have the same model: evaluate it once.
            same = earlier_report(args, evaluated, record["kept"], "none") if base is not None else None
            if same is not None:
                report = {**same, "reused": True}
            else:
                report = ev.evaluate(args.model, tasks, backend=args.backend, prune=prune, limit=args.limit,
                                     ppl_limit=args.ppl_windows, seed=args.seed, seq_len=args.seq_len,
                                     dtype=args.dtype, progress=True, reference=args.reference)
                evaluated[(tuple(report["kept"]), "none")] = report
            if base is not None:
                gen_table.require_blocks(report, record["kept"], f"{name} keep={ratio}")
            record["eval"] = report
            records.append(record)
            log_record(record)
            if args.heal and base is not None:
                records.append(healed_record(args, record, options, tasks, evaluated))
                log_record(records[-1])
    if base is not None and base["method"] == "sleb":
        prorate_greedy_cost([r for r in records if r["heal"] == "none"])
    return records


def earlier_report(args, evaluated: dict[tuple, dict[str, Any]], kept: list[int], heal: str) -> dict | None:
    """The report of a model already evaluated with the same blocks and heal: by this run,
    or (``--merge``) by a run that shares the file, such as a concurrent one."""
    key = (tuple(kept), heal)
    if key not in evaluated and args.merge:
        path = (args.out / args.name).with_suffix(".json")
        records = json.loads(path.read_text())["records"] if path.exists() else []
        for r in records:
            if "kept" in r and r["eval"].get("tasks", {}).keys() >= set(args.ppl_tasks):
                evaluated.setdefault((tuple(r["kept"]), r.get("heal", "none")), r["eval"])
    return evaluated.get(key)


def log_record(record: dict[str, Any]) -> None:
    ppl = {task.removesuffix("-ppl"): round(m["ppl"], 2) for task, m in record["eval"]["tasks"].items()
           if "ppl" in m}
    logger.info("%s keep=%.2f seed=%d heal=%s ppl=%s zero-shot=%s", record["row"], record["keep"], record["seed"],
                record["heal"], ppl, record["eval"].get("mc_avg_acc_norm"))


def healed_record(args, plain: dict[str, Any], options: dict[str, Any], tasks: list[str],
                  evaluated: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """The plain record's pruned set with ``heal=args.heal``: the product's own maps (fitted on
    the calibration settings of ``options``, stored beside the score cache), folded by the
    transformers backend as ``vllm-miprun eval --heal MODE`` does."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.heal import prepare_maps

    kept = plain["kept"]
    record = {k: v for k, v in plain.items() if k != "eval"} | {"heal": args.heal}
    same = earlier_report(args, evaluated, kept, args.heal)
    if same is not None:
        return record | {"eval": {**same, "reused": True}}
    healed = {**options, "cache_dir": str(args.cache_root), "heal": args.heal}
    start = time.perf_counter()  # the fit alone; the evaluator's own load reads the stored maps
    maps = prepare_maps(args.model, MiprunOptions.from_dict(healed), kept, len(kept) + len(plain["pruned"]),
                        progress=False)
    record.update(heal_seconds=round(time.perf_counter() - start, 3), healed_runs=sorted(maps))
    report = ev.evaluate(args.model, tasks, backend="transformers", prune=healed, limit=args.limit,
                         ppl_limit=args.ppl_windows, seed=args.seed, seq_len=args.seq_len, dtype=args.dtype,
                         progress=True, reference=args.reference)
    gen_table.require_blocks(report, kept, f"{plain['row']} keep={plain['keep']} heal={args.heal}")
    evaluated[(tuple(kept), args.heal)] = report
    return record | {"eval": report}


def method_cost(plan, plan_seconds: float) -> dict[str, float]:
    """Calibration seconds (the score cache's own timing, paid once per model and seed) and
    selection seconds (this plan's wall time, minus calibration if it ran inside it).

    SLEB reads no MI score: only its own forward passes (selection) count for it."""
    if plan.cache_path is None or plan.method == "sleb":
        computed = plan.scores_source == "computed" and plan.cache_path is not None
        calibration = _cache_seconds(plan.cache_path) if computed else 0.0
        return {"calibration_seconds": 0.0, "selection_seconds": round(max(plan_seconds - calibration, 0.0), 3)}
    calibration = _cache_seconds(plan.cache_path)
    selection = plan_seconds - (calibration if plan.scores_source == "computed" else 0.0)
    return {"calibration_seconds": round(calibration, 3), "selection_seconds": round(max(selection, 0.0), 3)}


def _cache_seconds(path) -> float:
    from vllm_miprun.pipeline.store import read_cache

    return float(read_cache(path).timings.get("total_s", 0.0))


def prorate_greedy_cost(records: list[dict[str, Any]]) -> None:
    """SLEB's deepest run caches every shallower answer (its greedy prefixes), so the later
    plans are cache hits. Charge each the share of the deepest run's time that its own
    rounds take: round r costs L - r evaluations."""
    deepest = min(records, key=lambda r: r["keep"])
    count = len(deepest["kept"]) + len(deepest["pruned"])
    evaluations = lambda drops: sum(count - r for r in range(drops))  # noqa: E731
    for record in records:
        if record is not deepest:
            share = evaluations(len(record["pruned"])) / evaluations(len(deepest["pruned"]))
            record["selection_seconds"] = round(deepest["selection_seconds"] * share, 3)
            record["selection_note"] = f"prorated from keep {deepest['keep']} by evaluation count"


def stability(args, base: dict[str, Any], name: str) -> dict[str, float | None]:
    """Mean pairwise Jaccard of the pruned sets over calibration seeds, per ``--stability-keeps``."""
    if base["method"] in ("last",) or name in args.no_stability:
        return {}
    found = {}
    for keep in args.stability_keeps:
        sets = [set(timed_plan(args.model, {**base, "keep": keep, "seed": seed}, args.cache_root)[0].pruned)
                for seed in range(args.stability_seeds)]
        found[str(keep)] = mean_pairwise_jaccard(sets)
        logger.info("%s keep=%.2f stability over %d seeds: %.3f", name, keep, len(sets), found[str(keep)])
    return found


def markdown_table(records: list[dict[str, Any]], stable: dict[str, dict], limit: int | None) -> str:
    """README table: one line per method and keep ratio (random: mean over its seeds)."""
    lines = ["| keep | method | wiki ppl | c4 ppl | zero-shot acc_norm | " + " | ".join(gen_table.HEADERS) +
             " | stability (Jaccard) | calibration s | selection s | pruned |", "|---" * 12 + "|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for (row, keep), rs in sorted(_by_row_keep(records).items(), key=lambda kv: (-kv[0][1], ROW_ORDER(kv[0][0]))):
        wiki = _mean([r["eval"]["tasks"]["wiki-ppl"]["ppl"] for r in rs])
        c4 = _mean([r["eval"]["tasks"]["c4-ppl"]["ppl"] for r in rs])
        zs = _mean([r["eval"].get("mc_avg_acc_norm") for r in rs])
        calib = _mean([r.get("calibration_seconds") for r in rs])
        sel = _mean([r.get("selection_seconds") for r in rs])
        pruned = "; ".join(",".join(map(str, r.get("pruned", []))) for r in rs) or "-"
        jac = stable.get(row, {}).get(str(keep))
        label = row if len(rs) == 1 else f"{row} (mean of {len(rs)} seeds)"
        ppl = lambda v: fmt(v, ".1f" if v is None or v < 1000 else ".3g")  # noqa: E731
        lines.append(f"| {keep} | {label} | {ppl(wiki)} | {ppl(c4)} | {fmt(zs, '.3f')} | {gen_table.cells(rs)} | "
                     f"{fmt(jac, '.2f')} | {fmt(calib, '.0f')} | {fmt(sel, '.0f')} | {pruned} |")
    tasks = len(ZERO_SHOT)
    if limit:
        # acc_norm over tasks*limit examples: a binomial standard error of about sqrt(.25/n)
        lines.append(f"\nZero-shot: average acc_norm over {tasks} tasks x {limit} seeded examples "
                     f"(standard error about {100 * (0.25 / (tasks * limit)) ** 0.5:.1f} points).")
    lines.append(gen_table.note(records))
    return "\n".join(lines) + "\n"


def ROW_ORDER(name: str) -> int:  # noqa: N802 - table order follows ROWS
    names = [r[0] for r in ROWS]
    return names.index(name) if name in names else len(names)


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
        # `last` and `random` reach 1e4-1e10: cap the axis so the close methods stay readable
        axis.set(xlabel="keep ratio", ylabel="perplexity (log; capped at 1e4)", title=task, yscale="log")
        axis.set_ylim(top=min(axis.get_ylim()[1], PLOT_CAP))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: converted SmolLM2-135M)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of {[r[0] for r in ROWS]} "
                                                     "(run in this order)")
    parser.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",")), default=RATIOS)
    parser.add_argument("--backend", choices=ev.BACKENDS, default="vllm")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default all)")
    parser.add_argument("--ppl-windows", type=int, default=ev.DEFAULT_PPL_WINDOWS)
    parser.add_argument("--seq-len", type=int, default=ev.DEFAULT_SEQ_LEN)
    parser.add_argument("--no-zero-shot", action="store_true", help="perplexity only")
    parser.add_argument("--ppl-tasks", type=ev.parse_tasks, default=("wiki-ppl", "c4-ppl"),
                        help="perplexity tasks (ppl = every domain, the evaluation-only ones included)")
    parser.add_argument("--gen-tasks", type=lambda v: tuple(ev.parse_tasks(v)) if v else (), default=ev.GEN_TASKS,
                        help="generative measures per row ('' for none): greedy-agreement, lambada-em")
    parser.add_argument("--add-gen", action="store_true",
                        help="only evaluate --gen-tasks on the pruned sets <name>.json records (of --rows and "
                             "--ratios) and write them into it; nothing is planned or recomputed")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite <name>.md and the plot from <name>.json (no model is run)")
    parser.add_argument("--max-seeds", type=int, default=None,
                        help="at most this many calibration seeds per row (random has 3)")
    parser.add_argument("--heal", nargs="?", const="linear", default=None, choices=("linear", "distill"),
                        help="also evaluate every pruned set with this heal (default linear); writes the heal table")
    parser.add_argument("--stability-seeds", type=int, default=5)
    parser.add_argument("--stability-keeps", type=lambda v: tuple(float(x) for x in v.split(",")), default=RATIOS,
                        help="keep ratios at which stability is measured")
    parser.add_argument("--no-stability", default="", type=lambda s: tuple(filter(None, s.split(","))),
                        help="methods whose stability is not measured (e.g. sleb: a greedy search per seed)")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="score cache folder shared by all rows (default: a new empty temporary folder, "
                             "so calibration and selection times are real)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zero-shot subsets")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="quality_smollm2", help="file stem of the outputs in --out")
    parser.add_argument("--merge", action="store_true",
                        help="keep what an existing <name>.json (same settings) holds for other rows and keep "
                             "ratios, and replace only the (row, keep) pairs run now; the JSON lists every "
                             "command that contributed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        saved = json.loads((args.out / args.name).with_suffix(".json").read_text())
        for key in SETTINGS:
            setattr(args, key, saved[key])
        write_outputs(args, saved["records"], saved.get("stability", {}), saved["commands"], saved)
        return
    args.model = args.model or harness.default_model_dir(prepare=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.reference = {}  # the dense model's greedy continuations, decoded once per run
    args.cache_root = args.cache_root or Path(tempfile.mkdtemp(prefix="miprun-quality-caches-"))
    if args.add_gen:
        gen_table.add_generative(args, write_outputs, {name: base for name, base, _ in ROWS if base is not None})
        return
    known = {name: (name, base, seeds[:args.max_seeds]) for name, base, seeds in ROWS}
    wanted = args.rows.split(",") if args.rows else list(known)
    if set(wanted) - set(known):
        raise SystemExit(f"--rows: unknown {sorted(set(wanted) - set(known))}; choose from {list(known)}")
    rows = [known[name] for name in wanted]

    records, stable, evaluated = [], {}, {}
    redo = {(name, 1.0) if base is None else (name, keep) for name, base, _ in rows for keep in args.ratios}
    if args.merge:
        previous_rows(args, redo)  # refuse other settings before any work
    command = {"command": "python " + " ".join(sys.argv), "rows": _row_keeps(redo)}
    for name, base, seeds in rows:
        records += run_row(args, name, base, seeds, evaluated)
        if base is not None and args.stability_seeds > 1:
            stable[name] = stability(args, base, name)
        # after every row: a long run can be stopped early
        save(args, redo, records, stable, command)


def save(args, redo, records: list[dict[str, Any]], stable: dict[str, dict], command: dict) -> None:
    """Write this run's rows, with (``--merge``) the other rows the file holds now, re-read
    under a lock so that concurrent runs with different rows keep each other's."""
    from filelock import FileLock

    with FileLock(str((args.out / args.name).with_suffix(".lock"))):
        kept_records, kept_stable, commands = previous_rows(args, redo) if args.merge else ([], {}, [])
        write_outputs(args, kept_records + records, {**kept_stable, **stable}, commands + [command])


SETTINGS = ("backend", "limit", "ppl_windows", "seq_len", "dtype")


def previous_rows(args, redo: set[tuple[str, float]]) -> tuple[list, dict, list]:
    """What ``<name>.json`` holds that this run does not redo: its records and stability
    outside the ``(row, keep)`` pairs in ``redo``, if it used the same settings."""
    path = (args.out / args.name).with_suffix(".json")
    if not path.exists():
        return [], {}, []
    old = json.loads(path.read_text())
    differ = {k: (old.get(k), getattr(args, k)) for k in SETTINGS if old.get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"--merge: {path} was made with other settings {differ} (old, new); "
                         "rerun every row instead, or pass the same settings")
    keep = [r for r in old["records"] if (r["row"], r["keep"]) not in redo]
    stable = {name: {k: v for k, v in by_keep.items() if (name, float(k)) not in redo}
              for name, by_keep in old.get("stability", {}).items()}
    made_by = old.get("commands") or [{"command": old.get("command"), "rows": sorted({r["row"] for r in keep})}]
    commands = []
    for entry in made_by:
        pairs = {(r["row"], r["keep"]) for r in old["records"] if r["row"] in entry["rows"] or
                 f"{r['row']}@{r['keep']:g}" in entry["rows"]}  # bare row names: every keep of that row
        if pairs - redo:
            commands.append({"command": entry["command"], "rows": _row_keeps(pairs - redo)})
    return keep, {k: v for k, v in stable.items() if v}, commands


def _row_keeps(pairs) -> list[str]:
    return [f"{row}@{keep:g}" for row, keep in sorted(pairs)]


def write_outputs(args, records: list[dict[str, Any]], stable: dict[str, dict], commands: list[dict],
                  saved: dict[str, Any] | None = None) -> None:
    """The JSON (``saved`` as it is, when only re-rendering), the markdown and the plot."""
    healed = any(r.get("heal", "none") != "none" for r in records)
    plain = [r for r in records if r.get("heal", "none") == "none"]
    goals = heal_table.check_goals(records) if healed else check_goals(plain, stable)
    if saved is None:
        saved = harness.stamp({
            "benchmark": "benchmarks/bench_quality.py", "commands": commands, "model": str(args.model),
            "backend": args.backend, "limit": args.limit, "zero_shot_tasks": list(ZERO_SHOT),
            "ppl_windows": args.ppl_windows, "seq_len": args.seq_len, "dtype": args.dtype,
            "ppl_tasks": list(args.ppl_tasks), "heal": args.heal, "stability_seeds": args.stability_seeds,
            "stability_keeps": list(args.stability_keeps), "timed": TIMED, "records": records, "stability": stable})
    # merged runs may each have covered some ratios: say which the file holds
    ratios = sorted({r["keep"] for r in records if "kept" in r}, reverse=True)
    result = {**saved, "goals": goals, "ratios": ratios}
    stem = args.out / args.name
    table = heal_table.markdown(records, args.limit, len(ZERO_SHOT), [r[0] for r in ROWS]) if healed else \
        markdown_table(plain, stable, args.limit)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), table + "\n" + goals_markdown(goals))
    if healed:
        heal_table.plot(records, stem.with_name(stem.name + "_ppl.png"), PLOT_CAP)
    else:
        plot(plain, stem.with_name(stem.name + "_ppl.png"))
    gen_table.plot(records, stem.with_name(stem.name + "_gen.png"))
    logger.info("wrote %s.{json,md} and %s_ppl.png", stem, stem)


TIMED = ("calibration s: the score cache's own timing (one forward pass with the hidden states + every "
         "score), charged to the methods that read the scores (not SLEB, last, random); selection s: "
         "the plan's wall time minus calibration (SLEB's forward-pass search, MI-PRUN's refinement). "
         "Evaluation and model loading are not a method's cost.")


def _by_row_keep(records):
    groups: dict[tuple[str, float], list] = {}
    for r in records:
        groups.setdefault((r["row"], r["keep"]), []).append(r)
    return groups


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def check_goals(records, stable) -> list[dict[str, Any]]:
    """Issue 6's goals for the default MI-PRUN row, each met or not, with the figures."""
    groups = _by_row_keep(records)
    goals = []

    def metric(row, keep, get):
        return _mean([get(r) for r in groups.get((row, keep), [])])

    wiki = lambda r: r["eval"]["tasks"]["wiki-ppl"]["ppl"]  # noqa: E731
    c4 = lambda r: r["eval"]["tasks"]["c4-ppl"]["ppl"]  # noqa: E731
    zero = lambda r: r["eval"].get("mc_avg_acc_norm")  # noqa: E731
    cost = lambda r: (r.get("calibration_seconds") or 0) + (r.get("selection_seconds") or 0)  # noqa: E731
    for keep in sorted({k for (row, k) in groups if row == "mi-prun"}, reverse=True):
        mine = {n: metric("mi-prun", keep, f) for n, f in (("wiki", wiki), ("c4", c4), ("zero", zero))}
        shots = {row: {n: metric(row, keep, f) for n, f in (("wiki", wiki), ("c4", c4), ("zero", zero))}
                 for row in ONE_SHOT if (row, keep) in groups}
        if shots:
            best_w = min(shots, key=lambda r: shots[r]["wiki"])
            best_c = min(shots, key=lambda r: shots[r]["c4"])
            goals.append({"goal": "lower wiki and c4 perplexity than the best one-shot baseline", "keep": keep,
                          "met": mine["wiki"] < shots[best_w]["wiki"] and mine["c4"] < shots[best_c]["c4"],
                          "detail": f"wiki {mine['wiki']:.2f} vs {best_w} {shots[best_w]['wiki']:.2f}; "
                                    f"c4 {mine['c4']:.2f} vs {best_c} {shots[best_c]['c4']:.2f}"})
            zs = {r: v["zero"] for r, v in shots.items() if v["zero"] is not None}
            if mine["zero"] is not None and zs:
                best_z = max(zs, key=zs.get)
                goals.append({"goal": "zero-shot average at least the best one-shot baseline's", "keep": keep,
                              "met": mine["zero"] >= zs[best_z],
                              "detail": f"{mine['zero']:.3f} vs {best_z} {zs[best_z]:.3f}"})
        if ("sleb", keep) in groups:
            sw, sc = metric("sleb", keep, wiki), metric("sleb", keep, c4)
            mc, scost = metric("mi-prun", keep, cost), metric("sleb", keep, cost)
            close = mine["wiki"] <= 1.1 * sw and mine["c4"] <= 1.1 * sc
            cheap = scost > 0 and mc <= scost / 10
            goals.append({"goal": "within 10% of SLEB's perplexity at <= 1/10 of its calibration compute",
                          "keep": keep, "met": bool(close and cheap),
                          "detail": f"wiki {mine['wiki']:.2f} vs {sw:.2f} ({mine['wiki'] / sw - 1:+.1%}), "
                                    f"c4 {mine['c4']:.2f} vs {sc:.2f} ({mine['c4'] / sc - 1:+.1%}); "
                                    f"compute {mc:.0f} s vs {scost:.0f} s (ratio {mc / scost if scost else float('nan'):.2f})"})
    for key in sorted(set(stable.get("mi-prun", {})) & set(stable.get("shortgpt", {})), reverse=True):
        mine, theirs = stable["mi-prun"][key], stable["shortgpt"][key]
        goals.append({"goal": "stability (mean pairwise Jaccard over calibration seeds) at least ShortGPT's",
                      "keep": float(key), "met": mine >= theirs, "detail": f"{mine:.3f} vs {theirs:.3f}"})
    return goals


def goals_markdown(goals) -> str:
    lines = ["| goal | keep | met | figures |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['keep']} | {'met' if g['met'] else '**not met**'} | {g['detail']} |" for g in goals]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
