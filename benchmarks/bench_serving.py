"""Serving load: vLLM's own ``vllm bench serve`` against the pruned and the full server.

For each server, one after the other (never both at once: they would share the CPUs):

1. start ``vllm-miprun serve MODEL`` (pruned: ``--miprun-keep K --miprun-method M``;
   full: stock ``--load-format auto``) with the same dtype, KV memory and max length;
2. wait for ``/health``;
3. run ``vllm-miprun vllm bench serve`` with the random dataset (no hub: the tokenizer is
   the local model folder), ``--ignore-eos``, a fixed seed, warm-up requests
   (``--num-warmups``, excluded from the figures), ``--max-concurrency`` and
   ``--request-rate inf``, and ``--save-result`` to a JSON file;
4. stop the server (SIGINT, then SIGKILL to its process group after 30 s).

From each result it keeps request and output-token throughput and the TTFT, TPOT, ITL
and end-to-end latency mean and p50/p90/p99, and writes them side by side with the
pruned/full ratios to ``benchmarks/results/serving_smollm2.json``, next to the "ideal":
the planner's speed model (``vllm_miprun.core.latency.ideal_speedup``) for the blocks the
pruned server built, at batch ``--max-concurrency`` and context input + output / 2.
Server start-up and the warm-up requests are not timed.

Usage (~6 min on an idle 2-core CPU):
    python benchmarks/bench_serving.py --method mi-prun
Quick check: --quick
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.core.latency import DTYPE_BYTES, ideal_speedup, mean_decode_context  # noqa: E402
from vllm_miprun.model.checkpoint import read_config  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = ("50", "90", "99")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: converted SmolLM2-135M)")
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--method", default="mi-prun", help="'last' needs no score cache")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-warmups", type=int, default=4)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--dtype", default=None,
                   help="default: float32 on CPU (AVX2-only CPUs emulate bfloat16: prefill ~10x slower), "
                        "bfloat16 on CUDA")
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--extra-serve-args", default="", help="more `vllm serve` flags, space separated")
    p.add_argument("--out-json", default=str(RESULTS / "serving_smollm2.json"))
    p.add_argument("--logs", default=None, help="folder for server and bench logs")
    p.add_argument("--quick", action="store_true", help="8 prompts, 16 tokens, 1 warm-up (figures are noise)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or "float32"  # CPU: AVX2-only CPUs emulate bfloat16
    if args.quick:
        args.num_prompts, args.output_len, args.num_warmups, args.max_concurrency = 8, 16, 1, 4
        args.input_len = min(args.input_len, 32)
    return args


def miprun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "vllm_miprun.tools.cli", *args]


def run_one(name, serve_args, args, model, workdir, logs):
    port = args.port or harness.free_port()
    log = open(logs / f"{name}-server.log", "w")
    serve = miprun_cmd("serve", model, "--port", str(port), "--host", "127.0.0.1", "--dtype", args.dtype,
                       "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)),
                       "--max-model-len", str(args.input_len + args.output_len + 64),
                       "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
                       *serve_args, *args.extra_serve_args.split())
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(serve[3:])}", flush=True)
    proc = harness.start_in_own_group(serve, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        startup = harness.wait_healthy(proc, port, args.startup_timeout,
                                       lambda: (logs / f"{name}-server.log").read_text()[-4000:])
        result_file = f"{name}.json"
        bench = miprun_cmd(
            "vllm", "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--num-warmups", str(args.num_warmups), "--max-concurrency", str(args.max_concurrency),
            "--request-rate", str(args.request_rate), "--ignore-eos", "--seed", "0",
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(PERCENTILES),
            "--save-result", "--result-dir", str(workdir), "--result-filename", result_file,
            "--disable-tqdm",
        )
        with open(logs / f"{name}-bench.log", "w") as blog:
            done = subprocess.run(bench, stdout=blog, stderr=subprocess.STDOUT, cwd=ROOT, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}); see {logs / f'{name}-bench.log'}")
        raw = json.loads((workdir / result_file).read_text())
    finally:
        harness.stop_group(proc)
        log.close()
    keep = ["completed", "failed", "duration", "request_throughput", "output_throughput",
            "total_token_throughput", "total_input_tokens", "total_output_tokens", "max_concurrency"]
    built = re.search(r"miprun: built (\d+) of (\d+) blocks", (logs / f"{name}-server.log").read_text())
    row = {"server": name, "serve_args": serve_args, "startup_s": startup,
           "blocks_built": f"{built.group(1)} of {built.group(2)}" if built else "all (stock loader)",
           **{k: raw.get(k) for k in keep}}
    for metric in METRICS:
        row[metric] = {"mean_ms": raw.get(f"mean_{metric}_ms"),
                       **{f"p{p}_ms": raw.get(f"p{p}_{metric}_ms") for p in PERCENTILES}}
    return row, raw


def ideal_for(model: str, pruned_row: dict, args) -> dict:
    """The planner's speed model at this load: the blocks the pruned server built, batch =
    --max-concurrency, context = input + output / 2, the run dtype (``core.latency.ideal_speedup``)."""
    config = read_config(model)
    built = pruned_row["blocks_built"].split(" of ")
    kept = int(built[0]) if len(built) == 2 else int(config["num_hidden_layers"])
    context = mean_decode_context(args.input_len, args.output_len)
    dtype_bytes = DTYPE_BYTES.get(args.dtype, 2)
    return {"kept_blocks": kept, "batch_size": args.max_concurrency, "context_tokens": context,
            **ideal_speedup(config, kept, args.max_concurrency, context, dtype_bytes),
            "note": "flops/bytes: full over pruned cost per output token, no engine overhead; estimate: "
                    "the planner's FLOP-and-byte prediction (vllm_miprun/core/latency.py)"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        args.model = str(harness.default_model_dir())
    model = str(Path(args.model).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="miprun-serving-"))
    logs = Path(args.logs) if args.logs else workdir
    logs.mkdir(parents=True, exist_ok=True)
    pruned_args = ["--miprun-keep", str(args.keep), "--miprun-method", args.method]
    if args.method not in ("last", "random"):
        pruned_args.append("--miprun-require-cache")
    rows, raws = [], {}
    for name, serve_args in ((f"miprun-{args.keep}", pruned_args), ("stock-full", [])):
        row, raw = run_one(name, serve_args, args, model, workdir, logs)
        rows.append(row)
        raws[name] = raw
    pruned, full = rows
    ratios = {"request_throughput": pruned["request_throughput"] / full["request_throughput"],
              "output_throughput": pruned["output_throughput"] / full["output_throughput"]}
    for metric in METRICS:
        for key in ("mean_ms", *(f"p{p}_ms" for p in PERCENTILES)):
            a, b = pruned[metric][key], full[metric][key]
            ratios[f"{metric}_{key}"] = a / b if a and b else None
    summary = harness.stamp({
        "benchmark": "benchmarks/bench_serving.py",
        "command": "python " + " ".join(["benchmarks/bench_serving.py", *sys.argv[1:]]),
        "model": Path(model).name,
        "settings": {k: getattr(args, k) for k in ("keep", "method", "num_prompts", "num_warmups", "input_len",
                                                   "output_len", "max_concurrency", "request_rate", "dtype",
                                                   "kv_cache_gib")},
        "timed": "vllm bench serve over --num-prompts requests (random dataset, ignore_eos); "
                 "latencies in ms; throughput in requests/s and output tokens/s",
        "excluded": "server start-up (reported as startup_s) and --num-warmups warm-up requests",
        "servers": rows,
        "ratios_pruned_over_full": ratios,
        "ideal": ideal_for(model, pruned, args),
        "raw": {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, list)} for k, v in raws.items()},
    })
    if args.logs:  # raw results are in the summary; keep only the logs the user asked for
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    print(f"{'server':16s} {'req/s':>7s} {'out tok/s':>9s} " + " ".join(
        f"{m.upper()} p50/p90/p99 ms".rjust(26) for m in METRICS[:3]))
    for r in rows:
        print(f"{r['server']:16s} {r['request_throughput']:7.2f} {r['output_throughput']:9.1f} " + " ".join(
            "/".join(f"{r[m][f'p{p}_ms']:.1f}" for p in PERCENTILES).rjust(26) for m in METRICS[:3]))
    ideal = summary["ideal"]
    print(f"pruned/full: request throughput {ratios['request_throughput']:.3f}x, "
          f"TPOT p50 {ratios['tpot_p50_ms']:.3f}x; ideal {ideal['flops']:.3f}x (FLOPs), "
          f"planner's estimate {ideal['estimate']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
