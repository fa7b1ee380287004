"""Speed benchmark: stock vLLM vs miprun at several keep ratios vs an exported checkpoint.

Configurations, all on the same prompts, each in a fresh subprocess (so memory and KV
figures are independent), one after another within one run:

- ``stock-full``: stock vLLM on the full model (``--load-format auto``);
- ``miprun-<keep>``: the miprun loader at keep 1.0, 0.875, 0.75 and 0.5;
- ``stock-exported-<keep>``: stock vLLM on the checkpoint ``export_pruned`` wrote at 0.75;
- ``miprun-<keep>-healed`` (``--heal-keeps``): the miprun loader with ``heal=linear``, the
  same K blocks with maps folded into the weights (fitted here first, so loads are cache hits).

What is timed (see ``vllm_miprun.vllm.measure``):

- load time: the wall time of ``LLM(...)`` (engine construction: config, plan for
  miprun, weight loading, KV allocation, engine start-up), plus vLLM's own "Model
  loading took ... seconds" and the miprun loader's load seconds, parsed from the log.
  Plans are made first in this process, so a miprun load is a score-cache hit;
- per batch size B (default 1, 4, 16), greedy, ``ignore_eos``, prefix caching off:
  time to first token = wall time of ``generate`` with ``max_tokens=1`` for B prompts;
  time per output token = ``(T_N - T_1) / (N - 1)`` with T_N the time for N tokens;
  output tokens/s = ``B * N / T_N`` (prefill included). Median of ``--repeats`` runs.

Left out: one warm-up ``generate`` per engine, tokenisation (prompts are token ids),
process start and Python imports, the export itself, and engine shutdown.

Weight memory is counted from the safetensors headers (kept blocks + embeddings, norms,
LM head) at the run dtype. KV capacity is vLLM's ``num_gpu_blocks * block_size`` for a
fixed KV memory that is a whole number of 128-token pages for both L and K layers at
the export keep ratio, so the capacity ratio at that keep can be exactly L/K.

The ideal speed-up is ``vllm_miprun.core.latency.ideal_speedup``, the planner's own speed
model at this run's batch size, dtype and mean decode context (prompt + N/2): full over
pruned FLOPs and bytes per output token (blocks + LM head, no engine overhead; the targets
use the FLOP ideal), and ``estimate``, the speed-up the planner predicts without a profile.

For speed, which blocks are pruned barely matters (all blocks are the same shape), so
``--method last`` (no calibration) gives the same figures as the default ``mi-prun``,
which needs a score cache (``vllm-miprun calibrate MODEL_DIR`` first).

Usage (full run: ~18 min on an idle 2-core CPU, float32):
    python benchmarks/bench_speed.py --method mi-prun
Quick check (~3 min): --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.core.gains import exact_kv_memory  # noqa: E402
from vllm_miprun.core.latency import DTYPE_BYTES, ideal_speedup, mean_decode_context  # noqa: E402
from vllm_miprun.core.profile_fit import make_profile, profile_problem  # noqa: E402
from vllm_miprun.option_flags import add_command_flags, given_options  # noqa: E402
from vllm_miprun.options import option  # noqa: E402
from vllm_miprun.pipeline.speed_store import store_speed  # noqa: E402
from vllm_miprun.tools import harness  # noqa: E402
from vllm_miprun.tools import profiling as prof  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PLAN_FLAGS = ("method", "samples", "seq_len", "cache_dir")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: converted SmolLM2-135M)")
    p.add_argument("--keeps", default="1.0,0.875,0.75,0.5")
    p.add_argument("--export-keep", type=float, default=0.75)
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is kept")
    p.add_argument("--dtype", default=None,
                   help="default: float32 on CPU (AVX2-only CPUs emulate bfloat16: prefill ~10x slower), "
                        "bfloat16 on CUDA")
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="at least this much KV memory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="vLLM's device, and the device of any planning forward pass")
    p.add_argument("--no-eager", action="store_true", help="let vLLM compile / capture graphs")
    p.add_argument("--heal-keeps", default="",
                   help="keep ratios (among --keeps) also run with heal=linear, e.g. 0.75")
    # Plan options from the option table; the score cache they name must exist ('last' needs none).
    add_command_flags(p, [option(name) for name in PLAN_FLAGS],
                      defaults={name: option(name).default for name in PLAN_FLAGS})
    p.add_argument("--profile-batch-size", type=int, default=1,
                   help="batch size whose decode latencies are fitted into the stored profile")
    p.add_argument("--no-store", action="store_true", help="do not write profile/throughput to the caches")
    p.add_argument("--out-json", default=str(RESULTS / "speed_smollm2.json"))
    p.add_argument("--out-png", default=str(RESULTS / "speed_smollm2.png"))
    p.add_argument("--logs", default=None, help="folder for each engine's log")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: keeps 1.0,0.75, batch 1,4, 16 tokens, 1 repeat (figures are noise)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.quick:
        args.keeps, args.batch_sizes, args.output_tokens, args.repeats = "1.0,0.75", "1,4", 16, 1
        args.prompt_tokens = min(args.prompt_tokens, 32)
    return args


def extra_for(args, keep, heal="none"):
    """One miprun run's plan options: its engine's extra config, and the plan made here first."""
    return {"keep": keep, "require_cache": True, "device": args.device, "heal": heal, **given_options(args)}


def options_for(args, keep):
    from vllm_miprun.options import MiprunOptions

    return MiprunOptions.from_dict(extra_for(args, keep))


def fit_heal_maps(model, args, plans, keeps, num_blocks):
    """Fit (or read) the heal maps of each healed keep now, so that the engines' loads are
    cache hits like the plans'."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.heal import prepare_maps

    for keep in keeps:
        fitting = MiprunOptions.from_dict({**extra_for(args, keep, "linear"), "require_cache": False})
        maps = prepare_maps(model, fitting, list(plans[keep][0].kept), num_blocks, progress=False)
        print(f"heal keep={keep}: maps for the runs starting at {sorted(maps)}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.pipeline.store import CacheError
    from vllm_miprun.tools.export import export_pruned
    from vllm_miprun.pipeline.plan import make_plan

    if args.model is None:
        args.model = str(harness.default_model_dir())
    model = str(Path(args.model).resolve())
    config = read_config(model)
    num_blocks = int(config["num_hidden_layers"])
    keeps = [float(k) for k in args.keeps.split(",")]
    heal_keeps = [float(k) for k in args.heal_keeps.split(",") if k]
    if set(heal_keeps) - set(keeps):
        sys.exit(f"bench_speed: --heal-keeps {sorted(set(heal_keeps) - set(keeps))} are not among --keeps {keeps}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtype_bytes = DTYPE_BYTES.get(args.dtype, 2)
    context = mean_decode_context(args.prompt_tokens, args.output_tokens)

    # Plans first, in this process: validates the options and makes miprun loads cache hits.
    plans = {}
    for keep in sorted(set(keeps + [args.export_keep])):
        begin = time.perf_counter()
        try:
            plan = make_plan(model, options_for(args, keep), hf_config=config, progress=False)
        except CacheError as err:
            sys.exit(f"bench_speed: {err}\n(or pass --method last: for speed the block choice barely matters)")
        plans[keep] = (plan, time.perf_counter() - begin)
        print(f"plan keep={keep}: {len(plan.kept)}/{num_blocks} blocks, pruned {list(plan.pruned)}, "
              f"scores {plan.scores_source}", flush=True)

    fit_heal_maps(model, args, plans, heal_keeps, num_blocks)

    export_root = Path(tempfile.mkdtemp(prefix="miprun-bench-export-"))
    export_dir = export_root / f"{Path(model).name}-keep{args.export_keep}"
    export_pruned(model, export_dir, plans[args.export_keep][0])

    export_kept = len(plans[args.export_keep][0].kept)
    kv_bytes = exact_kv_memory(config, dtype_bytes, export_kept, int(args.kv_cache_gib * 2**30))
    prompts = prof.prompt_token_ids(model, max(batches), args.prompt_tokens)
    base = {"dtype": args.dtype, "kv_bytes": kv_bytes, "prompts": prompts, "batch_sizes": batches,
            "output_tokens": args.output_tokens, "repeats": args.repeats, "enforce_eager": not args.no_eager,
            "max_model_len": args.prompt_tokens + args.output_tokens + 16}
    configs = [("stock-full", 1.0, {"model": model, "load_format": "auto"}, None)]
    for keep in keeps:
        configs.append((f"miprun-{keep}", keep, {"model": model, "load_format": "miprun",
                                                  "extra": extra_for(args, keep)}, keep))
        if keep in heal_keeps:
            configs.append((f"miprun-{keep}-healed", keep, {"model": model, "load_format": "miprun",
                                                             "extra": extra_for(args, keep, "linear")}, keep))
    configs.append((f"stock-exported-{args.export_keep}", args.export_keep,
                    {"model": str(export_dir), "load_format": "auto"}, args.export_keep))

    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name, keep, spec, plan_keep in configs:
            kept = list(plans[plan_keep][0].kept) if plan_keep is not None else list(range(num_blocks))
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {len(kept)} blocks ...", flush=True)
            result = prof.run_engine({**base, **spec}, log_path=logs / f"{name}.log" if logs else None)
            if result["num_hidden_layers"] != len(kept):
                raise RuntimeError(f"{name}: engine built {result['num_hidden_layers']} blocks, plan keeps {len(kept)}")
            rows.append({
                "config": name, "keep": keep, "kept_blocks": len(kept), "kept": kept,
                "plan_seconds": plans[plan_keep][1] if spec["load_format"] == "miprun" else None,
                "weight_bytes": prof.weight_bytes(model, kept, dtype_bytes),
                "ideal": {str(b): ideal_speedup(config, len(kept), b, context, dtype_bytes) for b in batches},
                **result,
            })
    finally:
        shutil.rmtree(export_root, ignore_errors=True)

    summary = summarise(rows, batches, num_blocks, args, config, kv_bytes, context)
    if not args.no_store:
        summary["stored"] = store(model, args, rows, summary)
    write_outputs(summary, args)
    print_report(summary)
    return 0


def summarise(rows, batches, num_blocks, args, config, kv_bytes, context):
    full = rows[0]
    top = str(max(batches))
    for row in rows:
        row["ratios_vs_stock_full"] = {
            b: {"throughput": row["batches"][b]["output_tokens_per_s"] / full["batches"][b]["output_tokens_per_s"],
                "tpot_speedup": full["batches"][b]["tpot_s"] / row["batches"][b]["tpot_s"]
                if row["batches"][b]["tpot_s"] > 0 else None,
                "ttft_speedup": full["batches"][b]["ttft_s"] / row["batches"][b]["ttft_s"]}
            for b in row["batches"]
        }
        row["kv_capacity_ratio"] = row["kv_tokens"] / full["kv_tokens"]
        row["weight_ratio"] = row["weight_bytes"] / full["weight_bytes"]
    by = {row["config"]: row for row in rows}
    ek = args.export_keep
    mip, exp = by.get(f"miprun-{ek}"), by.get(f"stock-exported-{ek}")
    targets = []
    if mip and exp:
        gain = mip["ratios_vs_stock_full"][top]["throughput"]
        ideal = mip["ideal"][top]["flops"]
        targets.append(_target(f"throughput gain at keep {ek} / ideal (batch {top})", gain / ideal, ">=", 0.95,
                               f"gain {gain:.3f}x vs FLOP ideal {ideal:.3f}x"))
        tp = mip["batches"][top]["output_tokens_per_s"] / exp["batches"][top]["output_tokens_per_s"]
        targets.append(_target(f"throughput miprun / exported checkpoint (batch {top})", tp, ">=", 0.98,
                               f"{mip['batches'][top]['output_tokens_per_s']:.1f} vs "
                               f"{exp['batches'][top]['output_tokens_per_s']:.1f} tok/s"))
        lt = mip["construct_s"] / exp["construct_s"]
        targets.append(_target("load time miprun (cache hit) / exported (engine construction)", lt, "<=", 1.10,
                               f"{mip['construct_s']:.2f} s vs {exp['construct_s']:.2f} s"))
        want = num_blocks / mip["kept_blocks"]
        targets.append(_target(f"KV capacity ratio at keep {ek} (target exactly L/K = {num_blocks}/{mip['kept_blocks']})",
                               mip["kv_capacity_ratio"], "==", want,
                               f"{mip['kv_tokens']} vs {full['kv_tokens']} tokens"))
    for row in rows:
        plain = by.get(row["config"].removesuffix("-healed"))
        if row["config"].endswith("-healed") and plain:
            ratio = row["batches"][top]["output_tokens_per_s"] / plain["batches"][top]["output_tokens_per_s"]
            targets.append(_target(f"throughput healed / unhealed at keep {row['keep']} (batch {top}; "
                                   "same K blocks and shapes, so equal up to noise)", ratio, ">=", 0.98,
                                   f"{row['batches'][top]['output_tokens_per_s']:.1f} vs "
                                   f"{plain['batches'][top]['output_tokens_per_s']:.1f} tok/s"))
    return harness.stamp({
        "benchmark": "benchmarks/bench_speed.py",
        "command": "python " + " ".join(["benchmarks/bench_speed.py", *sys.argv[1:]]),
        "device": harness.machine_name(args.device),
        "model": Path(args.model).name,
        "num_blocks": num_blocks,
        "method": args.method,
        "method_note": "for speed the block choice barely matters: all blocks have the same shape",
        "settings": {"batch_sizes": batches, "output_tokens": args.output_tokens,
                     "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "dtype": args.dtype,
                     "kv_cache_bytes": kv_bytes, "enforce_eager": not args.no_eager,
                     "ideal_context_tokens": context},
        "timed": ("load: wall time of LLM(...) (construct_s), vLLM's logged model-loading seconds "
                  "(vllm_model_load_s), the miprun loader's seconds (miprun_loader_s); per batch size: "
                  "TTFT = generate(max_tokens=1) wall time, TPOT = (T_N - T_1)/(N-1), "
                  "output tokens/s = B*N/T_N (prefill included); median of repeats"),
        "excluded": ("one warm-up generate per engine, tokenisation (token-id prompts), process start and "
                     "imports, the export, engine shutdown; planning happens before the runs, so miprun "
                     "loads are score-cache hits"),
        "ideal": ("ideal_speedup in vllm_miprun/core/latency.py (the planner's speed model): full over "
                  "pruned FLOPs and bytes per output token of kept blocks + LM head at the batch size, "
                  "attention over prompt + N/2 context, no engine overhead (targets use the FLOP ideal); "
                  "estimate: the planner's FLOP-and-byte prediction, per-step overhead included"),
        "configs": rows,
        "targets": targets,
    }, device=args.device)


def _target(name, value, op, goal, detail):
    met = {">=": value >= goal, "<=": value <= goal, "==": abs(value - goal) <= 1e-12}[op]
    return {"measure": name, "value": value, "target": f"{op} {goal:.6g}", "met": bool(met), "detail": detail}


def store(model, args, rows, summary):
    """Profile (miprun runs at --profile-batch-size) and the full model's throughput."""
    written = {}
    pb = str(args.profile_batch_size)
    points = [(r["kept_blocks"], r["batches"][pb]["tpot_s"]) for r in plain_miprun(rows) if pb in r["batches"]]
    if len({k for k, _ in points}) >= 2:
        profile = make_profile(summary["num_blocks"], args.profile_batch_size, points, measured={
            "measured_by": "benchmarks/bench_speed.py", "device": summary["device"], "dtype": args.dtype,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "selection": f"method={args.method}", "when": summary["when"]})
        summary["profile"] = profile
        problem = profile_problem(profile)
        if problem:
            print(f"profile not stored: {problem}")
            summary["profile_not_stored"] = problem
        else:
            written["profile"] = store_speed(model, args.cache_dir, profile=profile)
    full = rows[0]
    top = str(max(int(b) for b in full["batches"]))
    throughput = {"tokens_per_s": full["batches"][top]["output_tokens_per_s"], "batch_size": int(top),
                  "output_tokens": args.output_tokens, "measured_by": "benchmarks/bench_speed.py",
                  "device": summary["device"]}
    written["throughput"] = store_speed(model, args.cache_dir, throughput=throughput)
    return written


def plain_miprun(rows):
    """The miprun loader's runs without healing: the keep curve and the fitted profile."""
    return [r for r in rows if r["config"].startswith("miprun-") and not r["config"].endswith("-healed")]


def write_outputs(summary, args):
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    try:
        plot(summary, Path(args.out_png))
        print(f"wrote {args.out_png}")
    except ImportError:
        print("matplotlib missing: no plot")


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["configs"]
    mip = sorted(plain_miprun(rows), key=lambda r: r["keep"])
    full = rows[0]
    exported = [r for r in rows if r["config"].startswith("stock-exported")]
    healed = [r for r in rows if r["config"].endswith("-healed")]
    batches = [str(b) for b in summary["settings"]["batch_sizes"]]
    L = summary["num_blocks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, b in enumerate(batches):
        color = f"C{i}"
        xs = [r["kept_blocks"] / L for r in mip]
        ax1.plot(xs, [r["batches"][b]["output_tokens_per_s"] for r in mip], "o-", color=color, label=f"miprun, batch {b}")
        ax1.plot(xs, [full["batches"][b]["output_tokens_per_s"] * r["ideal"][b]["flops"] for r in mip],
                 ":", color=color, label=f"ideal (FLOPs), batch {b}")
        ax1.plot([1.0], [full["batches"][b]["output_tokens_per_s"]], "s", color=color, mfc="none", ms=10)
        ax2.plot([1.0], [full["batches"][b]["tpot_s"] * 1e3], "s", color=color, mfc="none", ms=10)
        ax2.plot(xs, [r["batches"][b]["tpot_s"] * 1e3 for r in mip], "o-", color=color, label=f"miprun, batch {b}")
        ax2.plot(xs, [full["batches"][b]["tpot_s"] * 1e3 / r["ideal"][b]["flops"] for r in mip],
                 ":", color=color, label=f"ideal, batch {b}")
        for r, marker in [(r, "^") for r in exported] + [(r, "D") for r in healed]:
            ax1.plot([r["kept_blocks"] / L], [r["batches"][b]["output_tokens_per_s"]], marker, color=color, ms=9, mfc="none")
            ax2.plot([r["kept_blocks"] / L], [r["batches"][b]["tpot_s"] * 1e3], marker, color=color, ms=9, mfc="none")
    ax1.set(xlabel="kept blocks / L", ylabel="output tokens/s (prefill included)",
            title="Throughput (square: stock full, triangle: stock exported, diamond: healed)")
    ax2.set(xlabel="kept blocks / L", ylabel="ms per output token (decode)", title="Time per output token (same markers)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{summary['model']}, {summary['device']}, {summary['settings']['dtype']}, "
                 f"{summary['settings']['output_tokens']} output tokens", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def print_report(summary):
    batches = [str(b) for b in summary["settings"]["batch_sizes"]]
    head = f"{'config':24s} {'K':>3s} {'load s':>7s} {'weights MiB':>11s} {'KV tokens':>9s} {'KV x':>6s}"
    for b in batches:
        head += f" | b{b}: {'tok/s':>7s} {'x':>5s} {'ideal':>5s} {'est':>5s} {'TTFT ms':>7s} {'TPOT ms':>7s}"
    print(head)
    for r in summary["configs"]:
        line = (f"{r['config']:24s} {r['kept_blocks']:3d} {r['construct_s']:7.2f} {r['weight_bytes'] / 2**20:11.1f} "
                f"{r['kv_tokens']:9d} {r['kv_capacity_ratio']:6.3f}")
        for b in batches:
            m = r["batches"][b]
            line += (f" | b{b}: {m['output_tokens_per_s']:7.1f} {r['ratios_vs_stock_full'][b]['throughput']:5.2f} "
                     f"{r['ideal'][b]['flops']:5.2f} {r['ideal'][b]['estimate']:5.2f} "
                     f"{m['ttft_s'] * 1e3:7.1f} {m['tpot_s'] * 1e3:7.2f}")
        print(line)
    print("\nTargets:")
    for t in summary["targets"]:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'} {t['measure']}: {t['value']:.4f} (target {t['target']}; {t['detail']})")


if __name__ == "__main__":
    sys.exit(main())
