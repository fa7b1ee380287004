"""``vllm-miprun profile``: measure the per-block cost profile of a model with real vLLM engines.

``vllm-miprun profile MODEL_DIR [--batch-size N]`` starts one fresh engine per keep
count (default: all L blocks, about 3L/4 and L/2, pruned with ``method="last"``; which
blocks go barely matters for speed because the blocks of a decoder are the same shape),
measures the decode latency in seconds per output token at a stated batch size
(:mod:`vllm_miprun.vllm.measure` says what is timed), and fits

    latency(K) = fixed_s + K * block_s

by least squares over the measured keep counts ``K`` (:mod:`vllm_miprun.core.profile_fit`).
``fixed_s`` holds what does not scale with K: embeddings, final norm, LM head, sampling
and the engine's per-step overhead. Beside each measured point it records the speed-up
the one speed model (:mod:`vllm_miprun.core.latency`) estimates without a profile, at
the same batch size and context, so the estimate can be checked against the machine.

The profile is stored in the weights' speed sidecar and their score caches
(:mod:`vllm_miprun.pipeline.speed_store`), where the planner finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vllm_miprun.core.latency import DTYPE_BYTES, LatencyModel, ideal_speedup, mean_decode_context
from vllm_miprun.core.profile_fit import make_profile, profile_problem
from vllm_miprun.model.checkpoint import bytes_by_block, read_config, safetensors_files
from vllm_miprun.model.remap import layer_index
from vllm_miprun.pipeline.speed_store import store_speed
from vllm_miprun.tools.harness import machine_name, run_in_own_group
from vllm_miprun.vllm.measure import RESULT_MARK

DEFAULT_KEEPS = (1.0, 0.75, 0.5)

_LOG_FIGURES = {  # figure name -> the vLLM 0.32 log line that reports it (CPU and GPU runners)
    "vllm_init_model_s": re.compile(r"Initializing model took ([0-9.]+) seconds"),
    "vllm_load_weights_s": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "vllm_model_load_s": re.compile(r"Model loading took [0-9.]+ GiB memory and ([0-9.]+) seconds"),
    "vllm_model_load_gib": re.compile(r"Model loading took ([0-9.]+) GiB memory"),
    "vllm_init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
}
_MIPRUN_LOAD_LINE = re.compile(r"miprun: built (\d+) of (\d+) blocks.*?load ([0-9.]+) s")


def weight_bytes(model_dir: str | Path, kept: Iterable[int] | None, dtype_bytes: int | None = None) -> int:
    """Bytes of the weights a model with only ``kept`` blocks holds (all when None):
    every non-block tensor and the kept blocks, at ``dtype_bytes`` per element (the run
    dtype) or as stored. Counted by the one checkpoint reader, from the headers."""
    blocks, other = bytes_by_block(safetensors_files(model_dir), layer_index, dtype_bytes=dtype_bytes)
    wanted = blocks.keys() if kept is None else set(kept)
    return other + sum(size for index, size in blocks.items() if index in wanted)


def run_engine(spec: Mapping[str, Any], timeout_s: float = 900, env: Mapping[str, str] | None = None,
               log_path: str | Path | None = None) -> dict[str, Any]:
    """``measure_engine`` in a fresh ``python -m vllm_miprun.vllm.measure --worker`` process
    of its own process group (the shared harness kills the group, EngineCore included).

    Adds ``process_s`` (subprocess wall time) and, parsed from vLLM's log, the model
    loading time and memory vLLM reports, and the miprun loader's own load seconds.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(dict(spec), handle)
        spec_file = handle.name
    begin = time.perf_counter()
    try:
        returncode, stdout, stderr = run_in_own_group(
            [sys.executable, "-m", "vllm_miprun.vllm.measure", "--worker", spec_file],
            timeout_s, {**os.environ, **(env or {})})
    finally:
        os.unlink(spec_file)
    log = stdout + stderr
    if log_path:
        Path(log_path).write_text(log)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if returncode != 0 or not lines:
        raise RuntimeError(
            f"engine run failed (exit {returncode}) for {spec.get('model')} "
            f"{spec.get('load_format')} {spec.get('extra')}:\n{log[-3000:]}"
        )
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["process_s"] = time.perf_counter() - begin
    result.update(parse_load_log(log))
    return result


def parse_load_log(log: str) -> dict[str, float]:
    """Load figures vLLM and the miprun loader print, and ``model_load_s``: the miprun
    loader's seconds (create model + read kept weights + post-processing) when it ran,
    else vLLM's "Initializing model" + "Loading weights" seconds (stock loader)."""
    found = {}
    for name, pattern in _LOG_FIGURES.items():
        match = pattern.search(log)
        if match:
            found[name] = float(match.group(1))
    match = _MIPRUN_LOAD_LINE.search(log)
    if match:
        found["miprun_loader_s"] = float(match.group(3))
        found["model_load_s"] = found["miprun_loader_s"]
    elif "vllm_init_model_s" in found and "vllm_load_weights_s" in found:
        found["model_load_s"] = found["vllm_init_model_s"] + found["vllm_load_weights_s"]
    return found


def prompt_token_ids(model_dir: str | Path, count: int, length: int, seed: int = 1234) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens from the bundled Wikipedia text."""
    from vllm_miprun.pipeline.corpora import sample_token_windows
    from vllm_miprun.pipeline.calibrate import load_tokenizer

    windows = sample_token_windows(load_tokenizer(model_dir), "wiki", count, length, seed, part="evaluation")
    return [list(map(int, row)) for row in windows]


def profile_model(model_dir: str | Path, batch_size: int = 1, keeps: Sequence[float] = DEFAULT_KEEPS,
                  output_tokens: int = 64, prompt_tokens: int = 64, repeats: int = 2,
                  dtype: str = "bfloat16", kv_bytes: int = 256 * 2**20, cache_dir: str | Path | None = None,
                  store: bool = True, enforce_eager: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Measure decode latency at each keep ratio, fit the profile, and store it.

    Each run also records ``estimated_speedup``: what the FLOP-and-byte estimate predicts
    for that block count at this batch size, dtype and mean decode context.
    """
    from vllm_miprun.core.selection import keep_count

    config = read_config(model_dir)
    num_blocks = int(config["num_hidden_layers"])
    context = mean_decode_context(prompt_tokens, output_tokens)
    prompts = prompt_token_ids(model_dir, batch_size, prompt_tokens)
    points, runs = [], []
    for keep in keeps:
        kept = keep_count(float(keep), num_blocks)
        spec = {
            "model": str(model_dir), "load_format": "miprun",
            "extra": {"keep": float(keep), "method": "last"},
            "dtype": dtype, "kv_bytes": kv_bytes, "prompts": prompts, "batch_sizes": [batch_size],
            "output_tokens": output_tokens, "repeats": repeats, "enforce_eager": enforce_eager,
            "max_model_len": prompt_tokens + output_tokens + 16,
        }
        result = run_engine(spec)
        tpot = result["batches"][str(batch_size)]["tpot_s"]
        points.append((kept, tpot))
        runs.append({"keep": float(keep), "kept": kept, "tpot_s": tpot,
                     "ttft_s": result["batches"][str(batch_size)]["ttft_s"],
                     "estimated_speedup": ideal_speedup(config, kept, batch_size, context,
                                                        DTYPE_BYTES.get(dtype, 2))["estimate"]})
    profile = make_profile(num_blocks, batch_size, points, measured={
        "measured_by": "vllm-miprun profile",
        "device": machine_name(device),
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "context_tokens": context,
        "selection": "method=last (block choice barely matters for speed)",
        "runs": runs,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    problem = profile_problem(profile)
    if problem:
        raise ValueError(f"profile not stored: {problem}")
    written = store_speed(model_dir, cache_dir, profile=profile) if store else []
    return {"profile": profile, "written": written}


def profile_main(argv: list[str]) -> int:
    """``vllm-miprun profile MODEL_DIR [--batch-size N] [--keeps 1.0,0.75,0.5] ...``"""
    from vllm_miprun.errors import run_command
    from vllm_miprun.option_flags import add_command_flags, given_options
    from vllm_miprun.options import option

    parser = argparse.ArgumentParser(
        prog="vllm-miprun profile",
        description="Measure seconds per output token at several keep counts with vLLM, fit "
                    "latency = fixed_s + K * block_s, and store it with the score cache.")
    parser.add_argument("model_dir")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together; default %(default)s")
    parser.add_argument("--keeps", default=",".join(str(k) for k in DEFAULT_KEEPS),
                        help="keep ratios to measure (two or more); default %(default)s")
    parser.add_argument("--output-tokens", type=int, default=64, help="default %(default)s")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="default %(default)s")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median); default %(default)s")
    parser.add_argument("--dtype", default="bfloat16", help="default %(default)s")
    parser.add_argument("--kv-cache-gib", type=float, default=0.25, help="KV cache memory; default %(default)s")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="vLLM's device, recorded with the profile (not the calibration device)")
    parser.add_argument("--no-eager", action="store_true", help="let vLLM compile / capture graphs")
    add_command_flags(parser, [option("cache_dir")])
    parser.add_argument("--no-store", action="store_true", help="measure and print only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--keeps must be comma-separated numbers in (0, 1], got {args.keeps!r}")
    if len(set(keeps)) < 2 or not all(0 < k <= 1 for k in keeps):
        parser.error(f"--keeps needs two or more distinct ratios in (0, 1], got {args.keeps!r}")
    if args.batch_size < 1 or args.output_tokens < 2 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1, --output-tokens >= 2")
    if not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"{args.model_dir} has no config.json; pass a Hugging Face model folder")

    def measure_and_print() -> int:
        result = profile_model(
            args.model_dir, batch_size=args.batch_size, keeps=keeps, output_tokens=args.output_tokens,
            prompt_tokens=args.prompt_tokens, repeats=args.repeats, dtype=args.dtype,
            kv_bytes=int(args.kv_cache_gib * 2**30), cache_dir=given_options(args).get("cache_dir"),
            store=not args.no_store, enforce_eager=not args.no_eager, device=args.device,
        )
        sys.stdout.write((json.dumps(result) if args.json else format_profile(result)) + "\n")
        return 0

    # RuntimeError: the engine failed; reported as one line like bad input.
    return run_command("vllm-miprun profile", measure_and_print, also=(RuntimeError,))


def format_profile(result: dict) -> str:
    """The fitted profile, each measured point with its fitted speed-up beside the one speed
    model's estimate without a profile, and the files written, for a person."""
    profile = result["profile"]
    fitted = LatencyModel.from_profile(profile)
    lines = [f"batch size {profile['batch_size']}: fixed {profile['fixed_s'] * 1e3:.3f} ms + "
             f"{profile['block_s'][0] * 1e3:.3f} ms per block per output token "
             f"(rms residual {profile['measured']['residual_rms_s'] * 1e3:.3f} ms)"]
    lines += [f"  {run['kept']:4d} blocks: {run['tpot_s'] * 1e3:.3f} ms per token; speed-up fitted "
              f"{fitted.speedup(range(run['kept'])):.3f}x, estimated without a profile "
              f"{run['estimated_speedup']:.3f}x"
              for run in profile["measured"]["runs"]]
    lines += [f"wrote {path}" for path in result["written"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(profile_main(sys.argv[1:]))
