"""Fast-Block-Select vs the exact optimum on random DPI-obeying span-cost matrices.

For each L in {12, 24, 32, 80}, draws ``--instances`` random matrices (cycling through
the generator's kinds) with k uniform in 1..L/2, and reports:

- share of instances where Fast-Block-Select's objective equals the exact optimum
  (relative tolerance 1e-9), with and without the DPI certificate phase;
- mean distinct cost entries read: Fast-Block-Select, the exact DP (every admissible
  run, length <= k), and the full upper triangle L(L+1)/2;
- brute force: the number of k-subsets it scores, C(L, k), and the cost entries it
  reads counting repeats (one per maximal run per subset); the distinct entries it
  touches equal the exact DP's;
- wall time per instance.

``--cache PATH`` adds a real cache: a JSON file whose ``"cost"`` is an (L+1)x(L+1) list
with null below the diagonal; every k in 1..L/2 is run on it.

    python benchmarks/bench_select.py --instances 50 --seed 0 \\
        --out benchmarks/results/select_fbs_vs_exact.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_miprun.tools import harness  # noqa: E402

from vllm_miprun.core.selection import (  # noqa: E402
    INSTANCE_KINDS,
    dpi_violations,
    exact_select,
    fast_block_select,
    random_dpi_cost,
)

SIZES = (12, 24, 32, 80)


def brute_force_entry_reads(num_blocks: int, k: int) -> int:
    """Cost reads brute force makes: one per maximal run of every k-subset.

    A run [i, j) is maximal in C(L - n - e, k - n) subsets, where n = j - i and e counts
    the existing neighbours i-1 and j, which must be kept.
    """
    total = 0
    for n in range(1, k + 1):
        for i in range(num_blocks - n + 1):
            j = i + n
            neighbours = (i > 0) + (j < num_blocks)
            rest = num_blocks - n - neighbours
            if 0 <= k - n <= rest:
                total += math.comb(rest, k - n)
    return total


def run_instance(cost: np.ndarray, k: int) -> dict:
    num_blocks = cost.shape[0] - 1
    t0 = time.perf_counter()
    fast = fast_block_select(cost, k)
    t1 = time.perf_counter()
    best = exact_select(cost, k)
    t2 = time.perf_counter()
    heuristic = fast_block_select(cost, k, certify=False)
    tol = 1e-9 * max(1.0, abs(best.objective))
    return {
        "num_blocks": num_blocks,
        "k": k,
        "optimal": fast.objective <= best.objective + tol,
        "optimal_without_certificate": heuristic.objective <= best.objective + tol,
        "fbs_objective": fast.objective,
        "exact_objective": best.objective,
        "fbs_evaluations": fast.run_evaluations,
        "fbs_phase1_evaluations": fast.details["phase1_evaluations"],
        "exact_evaluations": best.run_evaluations,
        "upper_triangle": num_blocks * (num_blocks + 1) // 2,
        "brute_force_subsets": math.comb(num_blocks, k),
        "brute_force_entry_reads": brute_force_entry_reads(num_blocks, k),
        "fbs_seconds": t1 - t0,
        "exact_seconds": t2 - t1,
    }


def summarise(rows: list[dict]) -> dict:
    def mean(key):
        return statistics.fmean(r[key] for r in rows)

    return {
        "instances": len(rows),
        "share_optimal": mean("optimal"),
        "share_optimal_without_certificate": mean("optimal_without_certificate"),
        "mean_fbs_evaluations": mean("fbs_evaluations"),
        "mean_fbs_phase1_evaluations": mean("fbs_phase1_evaluations"),
        "mean_exact_evaluations": mean("exact_evaluations"),
        "upper_triangle": rows[0]["upper_triangle"],
        "fbs_over_exact_evaluations": mean("fbs_evaluations") / mean("exact_evaluations"),
        "fbs_over_upper_triangle": mean("fbs_evaluations") / rows[0]["upper_triangle"],
        "mean_brute_force_subsets": statistics.fmean(float(r["brute_force_subsets"]) for r in rows),
        "mean_brute_force_entry_reads": statistics.fmean(float(r["brute_force_entry_reads"]) for r in rows),
        "fbs_over_brute_force_entry_reads": statistics.fmean(
            r["fbs_evaluations"] / r["brute_force_entry_reads"] for r in rows
        ),
        "mean_fbs_seconds": mean("fbs_seconds"),
        "mean_exact_seconds": mean("exact_seconds"),
    }


def load_cache(path: str) -> np.ndarray:
    """The cost matrix of a real score cache (via the default objective), or of a JSON
    file holding a bare ``cost`` matrix."""
    with open(path) as f:
        data = json.load(f)
    if data.get("format") == "vllm-miprun-scores":
        from vllm_miprun.pipeline.store import read_cache
        from vllm_miprun.core.span_cost import span_cost_matrix

        return span_cost_matrix(read_cache(path))
    if "cost" not in data:
        raise SystemExit(f"{path} is neither a score cache nor a JSON file with a 'cost' matrix")
    return np.array([[math.nan if v is None else v for v in row] for row in data["cost"]], dtype=float)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=50, help="random instances per L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--cache", action="append", default=[], help="JSON file with key 'cost'")
    parser.add_argument("--out", default="benchmarks/results/select_fbs_vs_exact.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    results = {"seed": args.seed, "instances_per_size": args.instances, "sizes": {}, "caches": {}}
    rows_all = []
    print(f"{'L':>4} {'n':>4} {'opt':>6} {'opt-p1':>7} {'FBS':>8} {'exact':>8} {'FBS/ex':>7} "
          f"{'C(L,k)':>10} {'BF reads':>10} {'FBS ms':>8} {'ex ms':>7}")
    for num_blocks in args.sizes:
        rows = []
        for index in range(args.instances):
            kind = INSTANCE_KINDS[index % len(INSTANCE_KINDS)]
            cost = random_dpi_cost(num_blocks, rng, kind)
            k = int(rng.integers(1, num_blocks // 2 + 1))
            row = run_instance(cost, k)
            row["kind"] = kind
            rows.append(row)
        summary = summarise(rows)
        summary["by_kind"] = {
            kind: summarise([r for r in rows if r["kind"] == kind])["share_optimal"]
            for kind in INSTANCE_KINDS
            if any(r["kind"] == kind for r in rows)
        }
        results["sizes"][str(num_blocks)] = summary
        rows_all.extend(rows)
        print_row(str(num_blocks), summary)
    for path in args.cache:
        cost = load_cache(path)
        num_blocks = cost.shape[0] - 1
        rows = [run_instance(cost, k) for k in range(1, num_blocks // 2 + 1)]
        summary = summarise(rows)
        summary["dpi_violations"] = dpi_violations(cost)
        results["caches"][path] = summary
        rows_all.extend(rows)
        print_row(os.path.basename(path)[:4], summary)
    results["overall_share_optimal"] = statistics.fmean(r["optimal"] for r in rows_all)
    results["rows"] = [{k: (float(v) if isinstance(v, int) and v > 2**53 else v) for k, v in r.items()} for r in rows_all]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    harness.stamp(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"overall share at optimum: {results['overall_share_optimal']:.3f}; wrote {args.out}")
    return 0


def print_row(label: str, s: dict) -> None:
    print(
        f"{label:>4} {s['instances']:>4} {s['share_optimal']:>6.3f} {s['share_optimal_without_certificate']:>7.3f} "
        f"{s['mean_fbs_evaluations']:>8.1f} {s['mean_exact_evaluations']:>8.1f} "
        f"{s['fbs_over_exact_evaluations']:>7.3f} {s['mean_brute_force_subsets']:>10.3g} "
        f"{s['mean_brute_force_entry_reads']:>10.3g} {1000 * s['mean_fbs_seconds']:>8.1f} "
        f"{1000 * s['mean_exact_seconds']:>7.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
