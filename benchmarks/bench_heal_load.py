"""What healing adds to a load: the loader's heal steps, timed plain and ``heal=linear``.

The miprun loader does the same work for both settings except two steps, and this times
exactly those, in this process, with the functions the loader calls:

* ``prepare_maps``: read the stored maps and check them against the weights' fingerprint
  and settings (``{}`` at once for ``heal=none``);
* stream + fold: hand over every kept tensor from the safetensors files and fold each map
  into the down-projection before its run (``fold_stream`` over ``iter_kept_weights``).
  The files are memory-mapped, so the bytes of an unchanged tensor are read later, when
  vLLM copies it into the model (not timed, the same for both settings); a folded tensor
  is computed here.

Not timed: the engine (vLLM's start-up, model construction, ``load_weights`` into the
model, KV cache set-up), which is the same for both settings, and the first fit of the
maps (done once before timing when the maps are not stored yet, and reported).
Figures are medians over ``--repeats``; the ratio is healed / plain for each step.

    python benchmarks/bench_heal_load.py --keep 0.75 --repeats 5 \\
        --out-json benchmarks/results/heal_load_smollm2.json --out-png benchmarks/results/heal_load_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from vllm_miprun.model import checkpoint, weights
from vllm_miprun.options import MiprunOptions
from vllm_miprun.pipeline import heal, store
from vllm_miprun.pipeline.plan import make_plan
from vllm_miprun.tools.harness import default_model_dir, stamp

logger = logging.getLogger("bench_heal_load")


def timed(step, repeats: int) -> tuple[float, object]:
    """Median seconds of ``step()`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def heal_steps(model_dir: Path, options: MiprunOptions, repeats: int) -> dict:
    """The two heal-dependent load steps for one setting, timed."""
    plan = make_plan(model_dir, options, hf_config=checkpoint.read_config(model_dir))
    kept = list(plan.kept)
    maps_s, maps = timed(lambda: heal.prepare_maps(model_dir, options, kept, plan.num_blocks, progress=False),
                         repeats)
    files, read_bytes, _ = weights.plan_reads(checkpoint.safetensors_files(model_dir), kept)
    site = heal.heal_site(checkpoint.read_config(model_dir))

    def stream_and_fold() -> int:
        return sum(1 for _ in heal.fold_stream(weights.iter_kept_weights(files, kept), maps, kept, site))

    stream_s, tensors = timed(stream_and_fold, repeats)
    return {"kept": kept, "maps": len(maps), "prepare_maps_s": maps_s, "stream_and_fold_s": stream_s,
            "tensors": tensors, "read_bytes": read_bytes}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = ("prepare_maps_s", "stream_and_fold_s")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, setting in ((-0.2, "none"), (0.2, "linear")):
        ax.bar([i + offset for i in range(len(steps))], [result["runs"][setting][s] * 1000 for s in steps],
               width=0.4, label=f"heal={setting}")
    ax.set_xticks(range(len(steps)), ["read + check maps", "stream + fold kept weights"])
    ax.set_ylabel("milliseconds (median)")
    ax.set_title(f"heal steps of the load, keep {result['keep']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M)")
    parser.add_argument("--keep", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--out-png", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir = Path(args.model) if args.model else default_model_dir()

    runs, fit_s = {}, None
    for setting in ("none", "linear"):
        options = MiprunOptions.from_dict({"keep": args.keep, "heal": setting, "cache_dir": args.cache_dir})
        if setting == "linear":  # a first load fits and stores the maps; time the loads after it
            start = time.perf_counter()
            plan = make_plan(model_dir, options, hf_config=checkpoint.read_config(model_dir))
            heal.prepare_maps(model_dir, options, list(plan.kept), plan.num_blocks)
            fit_s = time.perf_counter() - start
        runs[setting] = heal_steps(model_dir, options, args.repeats)
        logger.info("heal=%s: %s", setting, runs[setting])
    ratios = {step: runs["linear"][step] / runs["none"][step] if runs["none"][step] else None
              for step in ("prepare_maps_s", "stream_and_fold_s")}
    added = sum(runs["linear"][s] - runs["none"][s] for s in ("prepare_maps_s", "stream_and_fold_s"))
    result = stamp({
        "model": str(model_dir), "keep": args.keep, "repeats": args.repeats, "runs": runs,
        "healed_over_plain": ratios, "heal_adds_s": added,
        "first_fit_or_read_s": fit_s,
        "timed": "prepare_maps (read + check stored maps) and handing every kept (memory-mapped) "
                 "tensor through fold_stream, in this process, median of repeats",
        "left_out": "vLLM engine start, model construction, load_weights into the model, KV cache "
                    "set-up (the same for both settings); the first fit of the maps",
    })
    store.atomic_write_text(Path(args.out_json), json.dumps(result, indent=1))
    plot(result, args.out_png)
    logger.info("heal adds %.3f s to the two steps; wrote %s and %s", added, args.out_json, args.out_png)


if __name__ == "__main__":
    main()
