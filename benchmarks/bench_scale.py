"""Scale benchmark (issue 14): calibration and every plan method on a random-init checkpoint
of a published shape, against a plain transformers load + forward over the same tokens.

Nothing is downloaded. The checkpoint is built with transformers from the shape's config
(random weights, stored in bf16), with a small BPE tokenizer trained on synthetic text,
and that text is the calibration set. Scores are meaningless on random weights; times
and memory are real. Every step runs in its own child process, so each peak is its own:

* ``forward_<dtype>``: ``AutoModelForCausalLM.from_pretrained`` (timed: load) and one
  ``model(ids, output_hidden_states=True)`` (timed: forward), in float32 and bfloat16;
* ``calibrate``: ``vllm_miprun.pipeline.calibrate.calibrate`` (block pass, span MI, baselines;
  the ratios leave out tokenising, which the forward side does untimed too);
* ``plan_<method>``: ``make_plan`` for every method from that score cache (the forward
  searches MI-PRUN and SLEB run the model again); ``plan_mi-prun_streamed`` with
  ``max_memory=0`` (no block resident between passes);
* ``--depth-check``: ``vllm-miprun plan --method mi-prun`` on the ``wide`` shape with 8
  and with 32 blocks; target: peak RSS(32) <= 1.3 x peak RSS(8).

Peak RSS is the child's VmHWM; peak GPU memory is ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_scale.py --shape tiny --device cpu --depth-check \\
        --out benchmarks/results/scale_cpu.json
    python benchmarks/bench_scale.py --shape llama-3.1-8b --device cuda --out $OUT/scale_gpu.json

Run it against another version of the package by putting that version first on
PYTHONPATH (the README's before/after columns do this with the commit before issue 14).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (architecture, hidden, blocks, heads, kv heads, intermediate, vocab, tied embeddings)
SHAPES = {
    "tiny": ("llama", 512, 8, 8, 4, 1536, 8192, False),
    "wide": ("llama", 768, 32, 12, 4, 3072, 4096, False),
    "llama-3.2-1b": ("llama", 2048, 16, 32, 8, 8192, 128256, True),
    "llama-3.1-8b": ("llama", 4096, 32, 32, 8, 14336, 128256, False),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
    "llama-3.1-70b": ("llama", 8192, 80, 64, 8, 28672, 128256, False),
}
METHODS = ("mi-prun", "shortgpt", "angular", "sleb", "last", "random")
DEPTH_TARGET = 1.3


# ----------------------------------------------------------------------------- child side


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _settings(args: dict):
    from vllm_miprun.options import CalibrationSettings

    return CalibrationSettings(dataset=args["text"], samples=args["samples"], seq_len=args["seq_len"])


def step_forward(args: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_miprun.pipeline.calibrate import calibration_ids

    ids = calibration_ids(args["model"], _settings(args)).to(args["device"])
    dtype = getattr(torch, args["dtype"])
    tic = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype).to(args["device"])
    _sync(args["device"])
    load_s = time.perf_counter() - tic
    tic = time.perf_counter()
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    _sync(args["device"])
    forward_s = time.perf_counter() - tic
    return {"load_s": load_s, "forward_s": forward_s, "seconds": load_s + forward_s,
            "hidden_states": len(out.hidden_states)}


def step_calibrate(args: dict) -> dict:
    from vllm_miprun.pipeline.calibrate import calibrate

    tic = time.perf_counter()
    result = calibrate(args["model"], _settings(args), device=args["device"], cache_dir=args["cache_dir"],
                       force=True, progress=False)
    _sync(args["device"])
    return {"seconds": time.perf_counter() - tic, "timings": result.cache.timings}


def step_plan(args: dict) -> dict:
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    extra = {"max_memory": args["max_memory"]} if args.get("max_memory") is not None else {}
    try:
        options = MiprunOptions(keep=args["keep"], method=args["method"], device=args["device"],
                                cache_dir=args["cache_dir"], require_cache=True, calibration=_settings(args), **extra)
    except TypeError as error:  # an older version without the option
        return {"skipped": f"{type(error).__name__}: {error}"}
    tic = time.perf_counter()
    plan = make_plan(args["model"], options, progress=False)
    _sync(args["device"])
    return {"seconds": time.perf_counter() - tic, "pruned": list(plan.pruned)}


def step_cli_plan(args: dict) -> dict:
    from vllm_miprun.tools import cli

    argv = ["plan", args["model"], "--method", args["method"], "--keep", str(args["keep"]), "--device",
            args["device"], "--cache-dir", args["cache_dir"], "--dataset", args["text"],
            "--samples", str(args["samples"]), "--seq-len", str(args["seq_len"]), "--json"]
    tic = time.perf_counter()
    code = cli.main(argv)
    return {"seconds": time.perf_counter() - tic, "exit_code": code, "argv": ["vllm-miprun", *argv]}


def step_build(args: dict) -> dict:
    """In a child, so that the parent never holds the GPU memory the build used."""
    return build_checkpoint(Path(args["model"]), args["shape"], args["layers"], args["device"], Path(args["text"]))


STEPS = {"build": step_build, "forward": step_forward, "calibrate": step_calibrate, "plan": step_plan, "cli_plan": step_cli_plan}


def run_step_here(name: str, args: dict) -> dict:
    import torch

    if args["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = STEPS[name](args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: steadier than wall time on a shared machine
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    if args["device"] == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


# ----------------------------------------------------------------------------- parent side


def run_step(name: str, args: dict) -> dict:
    """One step in a fresh child process; its JSON result is the last line of its stdout."""
    cmd = [sys.executable, __file__, "--step", name, "--step-args", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_text(path: Path, words: int, seed: int = 0) -> None:
    """Deterministic pseudo-words in paragraphs: calibration text that needs no corpus."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    paragraphs = []
    for _ in range(words // 100):
        paragraphs.append(" ".join(rng.choice(vocabulary) for _ in range(100)) + ".")
    path.write_text("\n\n".join(paragraphs) + "\n")


def build_checkpoint(folder: Path, shape: str, layers: int | None, device: str, text: Path) -> dict:
    """Random-init checkpoint of ``shape`` (bf16 safetensors) plus a tokenizer trained on ``text``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    arch, hidden, blocks, heads, kv, inter, vocab, tied = SHAPES[shape]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers or blocks, num_attention_heads=heads,
                  num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=8192,
                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, dtype="bfloat16")
    config = (transformers.Qwen2Config(**common, use_sliding_window=False) if arch == "qwen2"
              else transformers.LlamaConfig(**common))
    torch.manual_seed(0)
    tic = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(text)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"shape": shape, "architecture": arch, "hidden_size": hidden, "num_blocks": layers or blocks,
            "intermediate_size": inter, "vocab_size": vocab, "checkpoint_bytes": size,
            "build_s": time.perf_counter() - tic}


def fresh_cache(source: Path, target: Path) -> str:
    """A copy of the calibrated score cache, so no step sees another step's stored selections."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return str(target)


def run_shape(args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    synthetic_text(text, words=max(20000, 2 * args.samples * args.seq_len))
    model = work / "model"
    checkpoint = run_step("build", {"model": str(model), "shape": args.shape, "layers": args.layers,
                                    "device": args.device, "text": str(text)})
    if "error" in checkpoint:
        raise SystemExit(f"building the {args.shape} checkpoint failed: {checkpoint['error']}")
    print(f"built {args.shape}: {checkpoint['checkpoint_bytes'] / 2**30:.2f} GiB in {checkpoint['build_s']:.0f}s",
          flush=True)
    base = {"model": str(model), "text": str(text), "samples": args.samples, "seq_len": args.seq_len,
            "device": args.device, "keep": args.keep}
    steps = {}
    for dtype in ("float32", "bfloat16"):
        steps[f"forward_{dtype}"] = run_step("forward", {**base, "dtype": dtype})
        print(f"forward_{dtype}: {_brief(steps[f'forward_{dtype}'])}", flush=True)
    cache = work / "cache"
    steps["calibrate"] = run_step("calibrate", {**base, "cache_dir": str(cache)})
    print(f"calibrate: {_brief(steps['calibrate'])}", flush=True)
    methods = [(m, None) for m in args.methods] + [("mi-prun", 0)] * ("mi-prun" in args.methods)
    for method, max_memory in methods:
        name = f"plan_{method}" + ("_streamed" if max_memory == 0 else "")
        cache_dir = fresh_cache(cache, work / f"cache-{name}")
        steps[name] = run_step("plan", {**base, "method": method, "cache_dir": cache_dir, "max_memory": max_memory})
        print(f"{name}: {_brief(steps[name])}", flush=True)
    return {"checkpoint": checkpoint, "steps": steps, "ratios": ratios(steps)}


def ratios(steps: dict) -> dict:
    cal = steps.get("calibrate", {})
    out = {}
    if "seconds" not in cal:
        return out
    timings = cal.get("timings", {})
    # Both sides read the same token ids; tokenising them is left out of both.
    work = timings["total_s"] - timings.get("tokenize_s", 0.0)
    out["calibrate_work_s"] = work
    for dtype in ("float32", "bfloat16"):
        fwd = steps.get(f"forward_{dtype}", {})
        if "forward_s" in fwd:
            out[f"calibrate_over_load_plus_forward_{dtype}"] = work / (fwd["load_s"] + fwd["forward_s"])
            out[f"calibrate_over_forward_{dtype}"] = work / fwd["forward_s"]
    if "span_mi_s" in timings and timings.get("total_s"):
        out["span_statistics_share_of_calibration"] = timings["span_mi_s"] / timings["total_s"]
    return out


def depth_check(args, work: Path) -> dict:
    """Peak RSS of ``vllm-miprun plan --method mi-prun`` on the wide shape, 8 vs 32 blocks."""
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    synthetic_text(text, words=20000)
    result = {}
    for blocks in (8, 32):
        model = work / f"wide-{blocks}"
        run_step("build", {"model": str(model), "shape": "wide", "layers": blocks, "device": "cpu", "text": str(text)})
        base = {"model": str(model), "text": str(text), "samples": 4, "seq_len": 64, "device": args.device,
                "keep": 0.75, "cache_dir": str(work / f"cache-wide-{blocks}")}
        calibration = run_step("calibrate", base)
        plan = run_step("cli_plan", {**base, "method": "mi-prun"})
        result[f"blocks_{blocks}"] = {"calibrate": calibration, "plan": plan}
        print(f"depth {blocks}: plan {_brief(plan)}", flush=True)
    rss = [result[f"blocks_{b}"]["plan"].get("peak_rss_bytes") for b in (8, 32)]
    if all(rss):
        result["peak_rss_ratio_32_over_8"] = rss[1] / rss[0]
        result["target"] = DEPTH_TARGET
        result["met"] = rss[1] / rss[0] <= DEPTH_TARGET
    return result


def _brief(step: dict) -> str:
    if "error" in step or "skipped" in step:
        return step.get("error") or step["skipped"]
    text = f"{step['seconds']:.2f}s, peak RSS {step['peak_rss_bytes'] / 2**20:.0f} MiB"
    if "peak_gpu_bytes" in step:
        text += f", peak GPU {step['peak_gpu_bytes'] / 2**30:.2f} GiB"
    return text


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = {k: v for k, v in result["shape_run"]["steps"].items() if "seconds" in v}
    names = list(steps)
    memory_key = "peak_gpu_bytes" if result["device"] == "cuda" else "peak_rss_bytes"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, [steps[n]["seconds"] for n in names])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("seconds (log)")
    axes[1].barh(names, [steps[n][memory_key] / 2**30 for n in names])
    axes[1].set_xlabel(f"{memory_key.replace('_bytes', '')} (GiB)")
    fig.suptitle(f"{result['shape']} on {result['device']}, {result['tokens']} calibration tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(step: dict, device: str) -> str:
    if "seconds" not in step:
        return "—"
    memory = step.get("peak_gpu_bytes") if device == "cuda" else step["peak_rss_bytes"]
    cpu = f", {step['process_cpu_s']:.1f} s CPU" if "process_cpu_s" in step and device == "cpu" else ""
    return f"{step['seconds']:.1f} s{cpu}, {memory / 2**20:,.0f} MiB"


def markdown_table(before: dict, after: dict) -> str:
    """Before/after rows for the README: wall time, CPU time (CPU runs) and peak memory."""
    device = after["device"]
    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    lines = [f"| step ({after['shape']}, {after['tokens']} tokens, {device}) | before: time, {memory} "
             f"| after: time, {memory} |", "|---|---|---|"]
    for name, step in after["shape_run"]["steps"].items():
        lines.append(f"| {name} | {_cell(before['shape_run']['steps'].get(name, {}), device)} | {_cell(step, device)} |")
    for key in ("calibrate_over_load_plus_forward_float32", "calibrate_over_load_plus_forward_bfloat16",
                "span_statistics_share_of_calibration"):
        values = [run["shape_run"]["ratios"].get(key) for run in (before, after)]
        lines.append(f"| {key} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in values) + " |")
    if "depth_check" in after and "depth_check" in before:
        values = [run["depth_check"].get("peak_rss_ratio_32_over_8") for run in (before, after)]
        lines.append("| `plan --method mi-prun`, peak RSS 32 blocks / 8 blocks (wide shape; target <= 1.3) | "
                     + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's block count (disk space)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.75)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list; default all")
    parser.add_argument("--depth-check", action="store_true", help="also the 8- vs 32-block peak RSS check")
    parser.add_argument("--depth-only", action="store_true", help="only the depth check")
    parser.add_argument("--label", default="", help="a name for the code version measured (before/after)")
    parser.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/results/scale_cpu.json")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--step-args", help=argparse.SUPPRESS)
    parser.add_argument("--table", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                        help="print the README's before/after table from two runs and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(*(json.loads(Path(p).read_text()) for p in args.table)))
        return
    if args.step:
        print(json.dumps(run_step_here(args.step, json.loads(args.step_args))))
        return
    args.methods = [m for m in args.methods.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="miprun-scale-", dir=args.workdir))
    import torch

    try:
        result = {"label": args.label, "shape": args.shape, "device": args.device,
                  "tokens": args.samples * args.seq_len, "samples": args.samples, "seq_len": args.seq_len,
                  "keep": args.keep, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                  "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "pythonpath": os.environ.get("PYTHONPATH", "")}
        if args.device == "cuda":
            result["gpu"] = torch.cuda.get_device_name(0)
        if not args.depth_only:
            result["shape_run"] = run_shape(args, work / "shape")
        if args.depth_check or args.depth_only:
            result["depth_check"] = depth_check(args, work / "depth")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if "shape_run" in result:
        plot(result, out.with_suffix(".png"))
        print(json.dumps(result["shape_run"]["ratios"], indent=1))
    if "depth_check" in result:
        print("depth check:", {k: v for k, v in result["depth_check"].items() if not k.startswith("blocks_")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
