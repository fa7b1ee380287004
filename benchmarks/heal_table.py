"""Issue 16's quality table: every method x {plain, healed} x keep, from ``bench_quality --heal``.

Pure functions of the records ``bench_quality.py`` writes (each with ``row``, ``keep``,
``heal`` and its ``eval`` report). The goals are judged on the evaluation-only domains,
text unlike the calibration sets (``UNLIKE_PPL_TASKS``); wiki and c4 are shown but are
the calibration domains (their evaluation split, never calibrated on).

* geomean ×plain: the geometric mean over the unlike domains of healed / plain perplexity;
* worst: the unlike domain whose perplexity healing raises most, and by how much;
* vs SLEB: healed MI-PRUN's geometric-mean perplexity over the unlike domains, divided by
  unhealed SLEB's.
"""

from __future__ import annotations

import math
from typing import Any

import gen_table
from vllm_miprun.tools.eval_tasks import PPL_TASKS, UNLIKE_PPL_TASKS

GEOMEAN_GOAL = 0.85  # healed / plain, geometric mean over the unlike domains
WORST_GOAL = 0.02  # no unlike domain more than 2% worse than plain
GOAL_KEEPS = (0.75, 0.6)  # the keep ratios at which the first two goals must hold


def ppl(record: dict[str, Any], task: str) -> float | None:
    metrics = record["eval"]["tasks"].get(task)
    return None if metrics is None else metrics["ppl"]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def by_key(records: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, float, str], list] = {}
    for r in records:
        groups.setdefault((r["row"], r["keep"], r.get("heal", "none")), []).append(r)
    return groups


def domain_ppl(rs: list[dict[str, Any]], task: str) -> float | None:
    """Mean over seeds (random has several) of one domain's perplexity."""
    values = [ppl(r, task) for r in rs if ppl(r, task) is not None]
    return sum(values) / len(values) if values else None


def unlike_geomean(rs: list[dict[str, Any]]) -> float | None:
    values = [domain_ppl(rs, t) for t in UNLIKE_PPL_TASKS]
    return None if None in values else geomean(values)


def heal_effect(plain: list[dict[str, Any]], healed: list[dict[str, Any]]) -> tuple[float, str, float] | None:
    """(geomean healed/plain, worst unlike domain, its change), per seed then averaged; None
    without a plain record per healed one, or without every unlike domain."""
    if not plain or len(plain) != len(healed) or any(
            None in (ppl(p, t), ppl(h, t)) for p, h in zip(plain, healed) for t in UNLIKE_PPL_TASKS):
        return None
    ratios = {t: [ppl(h, t) / ppl(p, t) for p, h in zip(plain, healed)] for t in UNLIKE_PPL_TASKS}
    mean = {t: geomean(v) for t, v in ratios.items()}
    worst = max(mean, key=mean.get)
    return geomean(list(mean.values())), worst.removesuffix("-ppl"), mean[worst] - 1


def markdown(records: list[dict[str, Any]], limit: int | None, zero_shot_tasks: int,
             row_order: list[str] | None = None) -> str:
    groups = by_key(records)
    tasks = [t for t in PPL_TASKS if any(ppl(r, t) is not None for r in records)]
    generative = any(any(v is not None for v in gen_table.gen_metrics(r)) for r in records)
    head = ["keep", "method", "heal"] + [t.removesuffix("-ppl") for t in tasks] + \
        ["geomean unlike", "geomean ×plain", "worst unlike domain", "zero-shot acc_norm"] + \
        (list(gen_table.HEADERS) if generative else []) + ["pruned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(dict.fromkeys((row_order or []) + [r["row"] for r in records]))
    order = {name: i for i, name in enumerate(names)}
    for (row, keep, heal), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], order[kv[0][0]], kv[0][2] != "none")):
        cells = [_fmt(domain_ppl(rs, t)) for t in tasks]
        effect = heal_effect(groups.get((row, keep, "none"), []), rs) if heal != "none" else None
        zs = [r["eval"].get("mc_avg_acc_norm") for r in rs if r["eval"].get("mc_avg_acc_norm") is not None]
        label = row if len(rs) == 1 else f"{row} (mean of {len(rs)} seeds)"
        lines.append("| " + " | ".join([str(keep), label, heal] + cells + [
            _fmt(unlike_geomean(rs)),
            "-" if effect is None else f"{effect[0]:.3f}",
            "-" if effect is None else f"{effect[1]} {effect[2]:+.1%}",
            "-" if not zs else f"{sum(zs) / len(zs):.3f}"] + ([gen_table.cells(rs)] if generative else []) + [
            "; ".join(",".join(map(str, r.get("pruned", []))) for r in rs) or "-"]) + " |")
    notes = [f"\nUnlike domains (the goals'): {', '.join(t.removesuffix('-ppl') for t in UNLIKE_PPL_TASKS)}. "
             "wiki and c4 are the calibration domains (evaluation split). geomean ×plain: healed / plain "
             "perplexity, geometric mean over the unlike domains; worst unlike domain: the one healing raises "
             "most (or lowers least), against plain."]
    if generative:
        notes.append(gen_table.note(records).strip())
    if limit:
        notes.append(f"Zero-shot: average acc_norm over {zero_shot_tasks} tasks x {limit} seeded examples "
                     f"(standard error about {100 * (0.25 / (zero_shot_tasks * limit)) ** 0.5:.1f} points).")
    return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


def check_goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 16's goals for MI-PRUN, each met or not, with the figures."""
    groups = by_key(records)
    goals = []
    for keep, mode in sorted({(k, heal) for (row, k, heal) in groups if row == "mi-prun" and heal != "none"},
                             reverse=True):
        plain, healed = groups.get(("mi-prun", keep, "none")), groups[("mi-prun", keep, mode)]
        effect = heal_effect(plain or [], healed) if plain else None
        if effect is not None and keep in GOAL_KEEPS:
            goals.append({"goal": f"MI-PRUN heal={mode} <= {GEOMEAN_GOAL}x unhealed (geomean over unlike domains)",
                          "keep": keep, "met": effect[0] <= GEOMEAN_GOAL, "detail": f"{effect[0]:.3f}x"})
            goals.append({"goal": f"no unlike domain more than {WORST_GOAL:.0%} worse than unhealed", "keep": keep,
                          "met": effect[2] <= WORST_GOAL, "detail": f"worst {effect[1]} {effect[2]:+.1%}"})
        mine = unlike_geomean(healed)
        for sleb_heal, label in (("none", "unhealed SLEB"), (mode, f"SLEB heal={mode}")):
            sleb = groups.get(("sleb", keep, sleb_heal))
            theirs = unlike_geomean(sleb) if sleb else None
            if mine is not None and theirs is not None:
                wins = sum(domain_ppl(healed, t) < domain_ppl(sleb, t) for t in UNLIKE_PPL_TASKS)
                goals.append({"goal": f"MI-PRUN heal={mode} beats {label} (geomean over unlike domains)",
                              "keep": keep, "met": mine < theirs,
                              "detail": f"{mine:.1f} vs {theirs:.1f} (lower on {wins} of {len(UNLIKE_PPL_TASKS)} domains)"})
    return goals


def plot(records: list[dict[str, Any]], path, cap: float) -> None:
    """Geometric-mean perplexity over the unlike domains against keep: solid plain, dashed healed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    groups = by_key(records)
    for index, row in enumerate(dict.fromkeys(r["row"] for r in records)):
        for heal, style in gen_table.HEAL_STYLES.items():
            points = sorted((keep, unlike_geomean(rs)) for (name, keep, h), rs in groups.items()
                            if name == row and h == heal and unlike_geomean(rs) is not None)
            if row == "dense" and points:
                axis.axhline(points[0][1], color="black", linestyle=":", label="dense")
            elif points:
                axis.plot(*zip(*points), style, marker="o", color=f"C{index}", label=f"{row} ({heal})")
    axis.set(xlabel="keep ratio", ylabel=f"perplexity, geomean over unlike domains (log; capped at {cap:g})",
             yscale="log", title="plain (solid) vs healed (dashed)")
    axis.set_ylim(top=min(axis.get_ylim()[1], cap))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else format(value, ".1f" if value < 1000 else ".3g")

