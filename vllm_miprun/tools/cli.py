"""``vllm-miprun``: calibrate, inspect scores, plan, check stability, serve, export, evaluate.

Bad input exits with status 2 and one line on stderr (what was expected, what was given,
what to do), never a traceback (``errors.run_command``). The option flags come from the
option table (``vllm_miprun.options``); only command-specific flags are declared here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from vllm_miprun.errors import interrupt, run_command
from vllm_miprun.option_flags import add_command_flags, command_line_wording, given_options
from vllm_miprun.options import (CalibrationSettings, MiprunOptions, OptionError, calibration_settings,
                                 command_options, option)

logger = logging.getLogger("vllm_miprun")

# Subcommands that hand their arguments to another parser (vLLM's, or the module's own):
# name -> (target, the line `vllm-miprun --help` shows for it).
PASSTHROUGH = {
    "serve": ("vllm_miprun.vllm.serve:serve_main", "`vllm serve` with the plugin: serve the pruned model"),
    "vllm": ("vllm_miprun.vllm.serve:vllm_main", "any `vllm` command with the plugin loaded"),
    "export": ("vllm_miprun.tools.export:export_main", "write the pruned (and healed) checkpoint to a folder"),
    "profile": ("vllm_miprun.tools.profiling:profile_main",
                "measure per-block step times on real engines, for latency budgets"),
}

USAGE_FLOW = """the usual flow (each command: vllm-miprun COMMAND --help):
  vllm-miprun calibrate MODEL_DIR          score the blocks once (cached)
  vllm-miprun plan MODEL_DIR --keep 0.75   see what would be dropped, and the predicted cost
  vllm serve MODEL_DIR --miprun-keep 0.75  serve it (plans from the cache, or calibrates first)"""


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def add_flags(parser: argparse.ArgumentParser, command: str, **kwargs) -> None:
    """The option-table flags of ``command`` (see ``vllm_miprun.options.OPTIONS``)."""
    add_command_flags(parser, command_options(command), **kwargs)


def calibration_args(args: argparse.Namespace) -> tuple[CalibrationSettings, str, str | None]:
    """(settings, device, cache_dir) from a command's flags, table defaults for the rest."""
    given = given_options(args)
    return calibration_settings(given), given.get("device", option("device").default), given.get("cache_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-miprun", description="Prune whole decoder blocks of a model served by vLLM.",
        epilog=USAGE_FLOW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    calibrate = sub.add_parser("calibrate", help="score every block and run of blocks; write the cache")
    calibrate.add_argument("model_dir")
    add_flags(calibrate, "calibrate")
    calibrate.add_argument("--force", action="store_true", help="recompute even if a cache matches")

    scores = sub.add_parser("scores", help="show the cached scores (never computes)")
    scores.add_argument("model_dir")
    add_flags(scores, "scores")
    scores.add_argument("--json", action="store_true", help="print one JSON object")

    plan = sub.add_parser("plan", help="choose the blocks to keep from the cached scores")
    plan.add_argument("model_dir")
    add_flags(plan, "plan", target_required=True)
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    stability = sub.add_parser("stability", help="agreement of pruned sets across calibration seeds")
    stability.add_argument("model_dir")
    stability.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1; default %(default)s")
    stability.add_argument("--methods", default="mi-prun,shortgpt,angular",
                           help="comma list; default %(default)s (sleb is slow: add it explicitly)")
    add_flags(stability, "stability", defaults={"keep": 0.75})
    stability.add_argument("--json-out", default=None, help="also write the table as JSON here")

    from vllm_miprun.tools.evaluate import add_eval_parser

    add_eval_parser(sub)
    for name, (target_fn, line) in PASSTHROUGH.items():
        passthrough = sub.add_parser(name, help=line, add_help=False)
        passthrough.set_defaults(passthrough=target_fn)
    return parser


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vllm_miprun.pipeline.calibrate import calibrate

    settings, device, cache_dir = calibration_args(args)
    result = calibrate(args.model_dir, settings, device=device, cache_dir=cache_dir, force=args.force)
    verb = "reused" if result.reused else "wrote"
    _out(f"{verb} score cache {result.path}")
    _out(format_block_table(result.cache))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    from vllm_miprun.pipeline.store import CacheError, read_cache
    from vllm_miprun.pipeline.calibrate import calibration_key, compute_identity, locate

    settings, device, cache_dir = calibration_args(args)
    compute = compute_identity(args.model_dir, device)
    path, fingerprint = locate(args.model_dir, settings, cache_dir, compute)
    if not path.exists():
        raise CacheError(
            f"no score cache for {args.model_dir} with {settings.to_json()} (looked for {path}); "
            f"create it with `vllm-miprun calibrate {args.model_dir}` and the same options"
        )
    cache = read_cache(path, fingerprint, calibration_key(settings, compute))
    if args.json:
        data = cache.to_json()
        data["cache_path"] = str(path)
        _out(json.dumps(data))
    else:
        _out(f"score cache {path}")
        _out(format_block_table(cache))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vllm_miprun.pipeline.plan import make_plan

    options = MiprunOptions.from_dict({**given_options(args), "require_cache": True})
    plan = make_plan(args.model_dir, options, measure_quality=True)
    if args.json:
        _out(json.dumps(plan.to_json()))
        return 0
    memory = plan_memory(args.model_dir, plan)
    _out(f"method {plan.method}: keep {len(plan.kept)}/{plan.num_blocks} blocks (ratio {plan.keep_ratio:.3f})")
    _out(f"  kept:    {compact_ranges(plan.kept)}")
    _out(f"  pruned:  {compact_ranges(plan.pruned)}")
    _out(f"  predicted speed-up {plan.predicted_speedup:.2f}x ({plan.latency_source})")
    if plan.quality_ppl_ratio is not None:
        _out(f"  predicted quality: perplexity x{plan.quality_ppl_ratio:.3f} of the dense model's on held-out "
             "calibration text"
             + (f"; budget {options.quality_budget:g}, {plan.binding_target} bound" if options.quality_budget else ""))
    _out(f"  weights saved {memory['weight_bytes_saved'] / 2**20:.1f} MiB, "
         f"KV cache saved {memory['kv_bytes_per_token_saved']} bytes/token in a 16-bit cache "
         f"(twice that in float32; capacity x{plan.num_blocks / len(plan.kept):.3f})")
    if plan.objective is not None:
        _out(f"  objective J = {plan.objective:.4f} (sum of span costs of the pruned runs; lower is better)")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from vllm_miprun.pipeline.plan import make_plan

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    json_out = output_file(args.json_out, "--json-out")  # refused before the first calibration
    given = given_options(args)
    # Every (method, seed) checked before the first calibration runs.
    runs = {method: [MiprunOptions.from_dict({**given, "method": method, "seed": seed})
                     for seed in range(args.seeds)] for method in methods}
    table = {}
    for method, seed_options in runs.items():
        pruned_sets = [set(make_plan(args.model_dir, options).pruned) for options in seed_options]
        table[method] = {"mean_pairwise_jaccard": mean_pairwise_jaccard(pruned_sets),
                         "pruned_sets": [sorted(s) for s in pruned_sets]}
    _out(f"{'method':<10} {'Jaccard':>8}  pruned sets over seeds 0..{args.seeds - 1}")
    for method, row in table.items():
        sets = " | ".join(compact_ranges(s) for s in row["pruned_sets"])
        _out(f"{method:<10} {row['mean_pairwise_jaccard']:>8.3f}  {sets}")
    if json_out is not None:
        from vllm_miprun.pipeline.store import atomic_write_text

        atomic_write_text(json_out, json.dumps({"keep": given["keep"], "seeds": args.seeds, "methods": table},
                                               indent=1) + "\n")
    return 0


def output_file(path: str | None, flag: str) -> Path | None:
    """The file a command will write at the end, or None; refused now if it cannot be written
    there (a folder, or a folder that is missing or read-only), not after the work."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise OptionError(f"{flag} expects a file path, got the folder {path}; name a file in it")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise OptionError(f"{flag} {path}: the folder {out.parent} does not exist or is not writable; "
                          "create it or name a file elsewhere")
    return out


def mean_pairwise_jaccard(sets: list[set[int]]) -> float:
    pairs = list(itertools.combinations(sets, 2))
    if not pairs:
        return 1.0
    return sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)


def plan_memory(model_dir: str, plan) -> dict[str, int]:
    """Weight bytes and KV bytes per token saved by the pruned blocks (from headers only),
    computed as the metrics do; KV at 2 bytes per value, vLLM's default bf16 cache."""
    from vllm_miprun.core.gains import kv_bytes_per_token_saved
    from vllm_miprun.model.checkpoint import read_config, safetensors_files
    from vllm_miprun.model.weights import pruned_weight_bytes

    return {
        "weight_bytes_saved": pruned_weight_bytes(safetensors_files(model_dir), plan.pruned),
        "kv_bytes_per_token_saved": kv_bytes_per_token_saved(read_config(model_dir), len(plan.pruned), 2),
    }


def compact_ranges(indices) -> str:
    items = sorted(indices)
    if not items:
        return "-"
    parts, start, prev = [], items[0], items[0]
    for value in items[1:] + [None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


def format_block_table(cache) -> str:
    """One row per block: MI with the next boundary, ShortGPT influence, angular step."""
    lines = [f"{cache.model.get('name')}: {cache.num_blocks} blocks, estimator {cache.estimator.get('name')}, "
             f"calibration {cache.calibration.get('dataset')} {cache.calibration.get('samples')}x"
             f"{cache.calibration.get('seq_len')} seed {cache.calibration.get('seed')}",
             f"{'block':>5} {'I(h_b;h_b+1)':>13} {'ShortGPT BI':>12} {'angular':>8}"]
    influence = cache.baselines["block_influence"]
    angular = cache.baselines["angular"]
    for b in range(cache.num_blocks):
        lines.append(f"{b:>5} {cache.block_scores[b]:>13.3f} {influence[b]:>12.4f} {angular[b][b + 1]:>8.4f}")
    lines.append(f"span matrix: {cache.num_blocks + 1}x{cache.num_blocks + 1} (I(h_i;h_j) for i<j); "
                 f"timings {', '.join(f'{k}={v:.1f}' for k, v in cache.timings.items())}")
    return "\n".join(lines)


COMMANDS = {"calibrate": cmd_calibrate, "scores": cmd_scores, "plan": cmd_plan, "stability": cmd_stability}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out; both
        # are recorded, so that an interrupt lost inside C code still stops the command
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    if argv and argv[0] in PASSTHROUGH:
        return _run_passthrough(PASSTHROUGH[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "func", None) or COMMANDS[args.command]
    return run_command(f"vllm-miprun {args.command}", lambda: handler(args), wording=command_line_wording)


def _run_passthrough(target: str, argv: list[str]) -> int:
    import importlib

    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)(argv)


def entry() -> None:
    """The console script: :func:`main`, then past vLLM's teardown after an in-process engine."""
    from vllm_miprun.vllm.engine_exit import finish

    finish(main())


if __name__ == "__main__":
    entry()
