"""Block-by-block calibration vs one plain transformers forward pass over the same tokens.

Each side runs in its own child process so that peak resident memory (VmHWM) is its own:

* ``forward``: ``AutoModelForCausalLM`` with the whole model in memory and
  ``output_hidden_states=True`` over the calibration batch. Timed: the forward pass only.
  Left out: loading the weights.
* ``calibrate``: ``vllm_miprun.pipeline.calibrate.compute_scores`` with the default estimator:
  the block-by-block pass (each block read from disk when it runs), the span MI matrix,
  ShortGPT and angular scores. Timed: all of it, weight reads included. Left out:
  tokenisation and the fingerprint (both sides share the tokens).

Targets (issue 2): calibration time <= 2x the forward pass; resident weights stay at
the embeddings, the LM head and one or two blocks.

    .venv/bin/python benchmarks/bench_calibration.py --out benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vllm_miprun.tools import harness


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_side(side: str, model_dir: str, samples: int, seq_len: int) -> dict:
    import torch

    from vllm_miprun.pipeline.calibrate import calibration_ids, compute_scores
    from vllm_miprun.options import CalibrationSettings

    settings = CalibrationSettings(samples=samples, seq_len=seq_len)
    ids = calibration_ids(model_dir, settings)
    baseline_rss = peak_rss_bytes()
    if side == "forward":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tic = time.perf_counter()
        with torch.inference_mode():
            out = model(ids, output_hidden_states=True)
        seconds = time.perf_counter() - tic
        extra = {"hidden_states": len(out.hidden_states)}
    else:
        tic = time.perf_counter()
        cache = compute_scores(model_dir, settings, fingerprint="benchmark", progress=False)
        seconds = time.perf_counter() - tic
        extra = {"timings": cache.timings, "estimator": cache.estimator}
    return {"side": side, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_model_bytes": baseline_rss, **extra}


def weight_sizes(model_dir: str) -> dict:
    """Weight bytes at float32 (the calibration dtype), from the one checkpoint reader."""
    from vllm_miprun.model.checkpoint import bytes_by_block, safetensors_files
    from vllm_miprun.model.remap import layer_index

    blocks, other = bytes_by_block(safetensors_files(model_dir), layer_index, dtype_bytes=4)
    return {"total_weight_bytes_fp32": other + sum(blocks.values()), "one_block_bytes_fp32": max(blocks.values()),
            "non_block_bytes_fp32": other}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/calibration.json")
    parser.add_argument("--side", choices=["forward", "calibrate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        args.model = str(harness.default_model_dir())
    if args.side:
        print(json.dumps(run_side(args.side, args.model, args.samples, args.seq_len)))
        return

    sides = {}
    for side in ("forward", "calibrate"):
        cmd = [sys.executable, __file__, "--side", side, "--model", args.model,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
    sizes = weight_sizes(args.model)
    fwd, cal = sides["forward"], sides["calibrate"]
    result = {
        "model": args.model,
        "tokens": args.samples * args.seq_len,
        "forward": fwd,
        "calibrate": cal,
        "weights": sizes,
        "time_ratio_calibrate_over_forward": cal["seconds"] / fwd["seconds"],
        "peak_rss_ratio_calibrate_over_forward": cal["peak_rss_bytes"] / fwd["peak_rss_bytes"],
        "peak_rss_above_start_ratio": (cal["peak_rss_bytes"] - cal["rss_before_model_bytes"])
        / (fwd["peak_rss_bytes"] - fwd["rss_before_model_bytes"]),
        "resident_weights_bound_bytes_fp32": sizes["non_block_bytes_fp32"] + sizes["one_block_bytes_fp32"],
        "targets": {"time_ratio_max": 2.0},
        "timed": "forward: model(ids, output_hidden_states=True); calibrate: compute_scores (block reads, "
                 "block-by-block pass, span MI, baselines)",
        "left_out": "tokenisation, fingerprint, loading the full model on the forward side, process start",
    }
    result["targets"]["time_ratio_met"] = result["time_ratio_calibrate_over_forward"] <= 2.0
    harness.stamp(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"forward {fwd['seconds']:.1f}s peak RSS {fwd['peak_rss_bytes'] / 2**20:.0f} MiB | "
          f"calibrate {cal['seconds']:.1f}s peak RSS {cal['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"time ratio {result['time_ratio_calibrate_over_forward']:.2f} (target <= 2.0), "
          f"peak RSS ratio {result['peak_rss_ratio_calibrate_over_forward']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
