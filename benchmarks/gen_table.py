"""The generative columns of ``bench_quality.py``: greedy agreement and LAMBADA exact match.

``add_generative`` fills them into the records of an existing result file without
planning or recomputing anything else: each record's pruned set is evaluated as it is
recorded (transformers: its kept indices; vLLM: ``drop`` of its pruned blocks).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from vllm_miprun.tools import evaluate as ev

logger = logging.getLogger("bench_quality")

HEADERS = ("agree (of 32)", "full match", "lambada EM")


def gen_metrics(record: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    tasks = record["eval"].get("tasks", {})
    agree, lambada = tasks.get("greedy-agreement", {}), tasks.get("lambada-em", {})
    return agree.get("mean_prefix"), agree.get("full_match"), lambada.get("exact_match")


def cells(rs: list[dict[str, Any]]) -> str:
    """The three markdown cells, each the mean over ``rs`` (random: its seeds)."""
    out = []
    for column, fmt in zip(zip(*(gen_metrics(r) for r in rs)), (".1f", ".2f", ".2f")):
        values = [v for v in column if v is not None]
        out.append(format(sum(values) / len(values), fmt) if values else "-")
    return " | ".join(out)


def note(records: list[dict[str, Any]]) -> str:
    measured = [r for r in records if gen_metrics(r)[0] is not None or gen_metrics(r)[2] is not None]
    if not measured:
        return ""
    tasks = measured[0]["eval"]["tasks"]
    lambada = tasks.get("lambada-em", {}).get("examples")
    prompts = tasks.get("greedy-agreement", {}).get("prompts")
    return (f"\nGeneration: agree = mean matching prefix of 32 greedy tokens against the dense model's on "
            f"{prompts or '-'} held-out wiki prompts, full match = share of those prompts matching all 32; "
            f"lambada EM = greedy last word right on {lambada or '-'} LAMBADA passages "
            f"(standard error about {100 * (0.25 / lambada) ** 0.5 if lambada else float('nan'):.0f} points). "
            f"'-': not measured for that row.")


HEAL_STYLES = {"none": "-", "linear": "--", "distill": "-."}  # as heal_table's perplexity plot


def line_key(record: dict[str, Any]) -> tuple[str, str]:
    """A plot line per method and heal mode."""
    return record["row"], record.get("heal", "none")


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Agreement and LAMBADA EM against keep ratio, one line per method (and heal);
    False if none measured."""
    points = [r for r in records if any(v is not None for v in gen_metrics(r))]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {row: f"C{i}" for i, row in enumerate(sorted({r["row"] for r in points} - {"dense"}))}
    for axis, index, title in ((axes[0], 0, "greedy agreement: matching prefix of 32 tokens (dense: 32)"),
                               (axes[1], 2, "LAMBADA exact match")):
        for row, heal in sorted({line_key(r) for r in points}):
            by_keep: dict[float, list[float]] = {}
            for r in points:
                value = gen_metrics(r)[index]
                if line_key(r) == (row, heal) and value is not None:
                    by_keep.setdefault(r["keep"], []).append(value)
            xs = sorted(by_keep)
            ys = [sum(by_keep[x]) / len(by_keep[x]) for x in xs]
            if not xs:
                continue
            if row == "dense":  # agreement: 32 by definition, off the scale of the pruned rows
                if index:
                    axis.axhline(ys[0], color="black", linestyle="--", label="dense")
            else:
                axis.plot(xs, ys, HEAL_STYLES.get(heal, ":"), marker="o", color=colours[row],
                          label=row if heal == "none" else f"{row} ({heal})")
        axis.set(xlabel="keep ratio", title=title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_generative(args, write_outputs, row_options: dict[str, dict[str, Any]]) -> None:
    """Evaluate ``args.gen_tasks`` on the recorded pruned sets of ``--rows`` x ``--ratios``, plain
    and (``args.heal``) healed with that mode, and write them into ``<name>.json`` (re-read under
    its lock, so concurrent runs keep theirs). ``row_options``: each row's plan options."""
    from filelock import FileLock

    path = (args.out / args.name).with_suffix(".json")
    if not path.exists() or not args.gen_tasks:
        raise SystemExit(f"--add-gen needs an existing {path} and --gen-tasks; run the rows first")
    saved = json.loads(path.read_text())
    if saved.get("backend") != args.backend or saved.get("dtype") != args.dtype:
        raise SystemExit(f"--add-gen: {path} was made with backend {saved.get('backend')} dtype "
                         f"{saved.get('dtype')}; pass the same --backend and --dtype")
    wanted = set(args.rows.split(",")) if args.rows else {r["row"] for r in saved["records"]}
    heals = {"none", args.heal or "none"}
    chosen = [r for r in saved["records"] if r["row"] in wanted and r.get("heal", "none") in heals
              and (r["row"] == "dense" or any(abs(r["keep"] - k) < 1e-9 for k in args.ratios))
              and not set(args.gen_tasks) <= r["eval"].get("tasks", {}).keys()]  # measured already: kept
    chosen.sort(key=lambda r: r["row"] != "dense")  # the dense row first: its continuations are the reference
    found: dict[tuple, dict[str, Any]] = {}
    for record in chosen:
        key = (tuple(record["kept"]) if "kept" in record else None, record.get("heal", "none"))
        if key not in found:
            report = ev.evaluate(args.model, list(args.gen_tasks), backend=args.backend,
                                 prune=recorded_model(args, record, row_options.get(record["row"], {})),
                                 seed=args.seed, dtype=args.dtype, progress=False, reference=args.reference)
            if key[0] is not None:
                require_blocks(report, key[0], f"{record['row']} keep={record['keep']} heal={key[1]}")
            found[key] = report["tasks"]
        logger.info("%s keep=%.2f seed=%s: %s", record["row"], record["keep"], record.get("seed"),
                    {t: {k: v for k, v in m.items() if k != "samples"} for t, m in found[key].items()})
        with FileLock(str(path.with_suffix(".lock"))):  # after every record: a long run can be stopped
            latest = json.loads(path.read_text())
            for r in latest["records"]:
                if _same(r, record):
                    r["eval"].setdefault("tasks", {}).update(found[key])
            done = [r for r in latest["records"] if any(_same(r, c) for c in chosen[:chosen.index(record) + 1])]
            command = {"command": "python " + " ".join(sys.argv), "added": list(args.gen_tasks),
                       "rows": sorted({f"{r['row']}@{r['keep']:g}" for r in done})}
            commands = [c for c in latest.get("commands", []) if c.get("command") != command["command"]]
            latest["commands"] = commands + [command]
            write_outputs(args, latest["records"], latest.get("stability", {}), latest["commands"], latest)


def require_blocks(report: dict[str, Any], kept: list[int], what: str) -> None:
    """Refuse a measurement of another model than the one planned: ``report``'s kept blocks
    must be ``kept``."""
    if report["kept"] != list(kept):
        raise RuntimeError(f"{what}: evaluated blocks {report['kept']} differ from the planned {list(kept)}")


def recorded_model(args, record: dict[str, Any], options: dict[str, Any]):
    """``evaluate``'s ``prune`` for the model a record measured: None (dense), its kept blocks
    (transformers) or dropped ones (vLLM); healed, its dropped blocks with the heal and the
    calibration settings its maps were fitted on, read from ``args.cache_root`` where stored."""
    if "kept" not in record:
        return None
    heal = record.get("heal", "none")
    if heal == "none":
        return list(record["kept"]) if args.backend == "transformers" else {"drop": list(record["pruned"])}
    calibration = {k: v for k, v in options.items() if k != "method"}
    return {**calibration, "drop": list(record["pruned"]), "seed": record["seed"], "heal": heal,
            "cache_dir": str(args.cache_root)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("row", "keep", "seed", "heal"))
