"""``python -m calibration.run RECIPE...``: make every recipe's score cache and plans ahead of serving.

Each target is planned with the functions ``vllm serve --load-format miprun`` uses in its
front process (``model_files.plan_source`` with the loader's ``make_plan_for``, then
``heal.prepare_maps``), so the cache files land where, and hold what, the server would
write. Recipes run in parallel as Ray tasks when Ray is installed (an existing cluster
through ``RAY_ADDRESS``, else a local one), one after another otherwise (``--no-ray``).
A summary table follows; ``--json FILE`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from calibration.recipe import Recipe, read_recipe
from vllm_miprun import envs
from vllm_miprun.errors import run_command

COLUMNS = ("recipe", "target", "kept", "scores", "healed", "seconds", "cache")


def run_recipe(recipe: Recipe, cache_dir: str) -> list[dict[str, Any]]:
    """Plan every target of ``recipe`` (calibrating once); one summary row per target."""
    from vllm_miprun.pipeline.heal import prepare_maps
    from vllm_miprun.vllm.loader import make_plan_for
    from vllm_miprun.vllm.model_files import ModelSource, plan_source

    source = ModelSource(recipe.model, recipe.revision, recipe.download_dir)
    rows = []
    for target in recipe.targets:
        options = recipe.options_for(target, cache_dir)
        start = time.perf_counter()
        planned = plan_source(source, options, lambda folder, config: make_plan_for(folder, options, config))
        plan = planned.plan
        if recipe.heal != "none":
            prepare_maps(planned.folder, options, list(plan.kept), plan.num_blocks)
        rows.append({"recipe": recipe.name, "model": recipe.model, "target": target,
                     "kept": list(plan.kept), "num_blocks": plan.num_blocks, "scores": plan.scores_source,
                     "healed": recipe.heal, "seconds": round(time.perf_counter() - start, 2),
                     "cache": plan.cache_path})
    return rows


def run_all(recipes: list[Recipe], cache_dir: str, use_ray: bool, cpus: float = 1, gpus: float = 0) -> list[dict]:
    """Every recipe's rows, in recipe order: Ray tasks when ``use_ray``, else in this process."""
    if not use_ray:
        return [row for recipe in recipes for row in run_recipe(recipe, cache_dir)]
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_recipe)
    return [row for rows in ray.get([task.remote(recipe, cache_dir) for recipe in recipes]) for row in rows]


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary: one line per (recipe, target)."""
    cells = [[str(_cell(row, column)) for column in COLUMNS] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells)]
    lines = [COLUMNS, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _cell(row: dict[str, Any], column: str) -> Any:
    if column == "target":
        return ", ".join(f"{k}={v}" for k, v in row["target"].items())
    if column == "kept":
        return f"{len(row['kept'])}/{row['num_blocks']}"
    return row[column]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m calibration.run", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path, help="recipe files (.json or .toml)")
    parser.add_argument("--cache-dir", help="score cache folder (default: $MIPRUN_CACHE_DIR, as vllm serve)")
    parser.add_argument("--no-ray", action="store_true", help="run the recipes one after another here")
    parser.add_argument("--cpus", type=float, default=1, help="CPUs per Ray task (default 1)")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per Ray task (default 0)")
    parser.add_argument("--json", type=Path, help="also write the summary rows to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    def work() -> int:
        recipes = [read_recipe(path) for path in args.recipes]  # every file checked before any work
        cache_dir = str((Path(args.cache_dir) if args.cache_dir else envs.cache_dir()).expanduser().resolve())
        rows = run_all(recipes, cache_dir, use_ray=not args.no_ray and ray_available(), cpus=args.cpus,
                       gpus=args.gpus)
        sys.stdout.write(format_table(rows) + "\n")
        if args.json:
            from vllm_miprun.pipeline.store import atomic_write_text

            atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
        return 0

    return run_command("python -m calibration.run", work)


if __name__ == "__main__":
    from vllm_miprun.vllm.engine_exit import finish

    finish(main())  # interrupted without Ray: past torch's teardown, which may abort (engine_exit)
