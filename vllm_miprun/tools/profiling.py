"""Measure the per-block cost profile of a model with real vLLM engines.

``vllm-miprun profile MODEL_DIR [--batch-size N]`` starts one fresh engine per keep
count (default: all L blocks, about 3L/4 and L/2, pruned with ``method="last"``; which
blocks go barely matters for speed because the blocks of a decoder are the same shape),
measures the decode latency in seconds per output token at a stated batch size, and
fits

    latency(K) = fixed_s + K * block_s

by least squares over the measured keep counts ``K``. The model treats every block as
costing the same (homogeneous blocks), so ``block_s`` is stored as one value repeated L
times, the shape :class:`vllm_miprun.core.latency.LatencyModel` reads. ``fixed_s`` holds
what does not scale with K: embeddings, final norm, LM head, sampling and the engine's
per-step overhead. A fit that comes out negative (noise) is clamped: a negative
``fixed_s`` refits through the origin, a negative slope keeps ``block_s = 0``.

What one engine measurement times (:func:`measure_engine`, in a subprocess): after one
untimed warm-up ``generate``, for each batch size B, ``generate`` of B prompts with
``max_tokens=1`` (time to first token, prefill of B prompts included) and with
``max_tokens=N`` (``ignore_eos``, greedy). The decode time per output token is
``(T_N - T_1) / (N - 1)``; output tokens per second is ``B * N / T_N`` (prefill
included). Engine construction, warm-up and tokenisation are excluded from those
figures; engine construction is timed separately as the load time. Prefix caching is
off so repeated prompts do not skip prefill.

Where the profile goes: the profile depends on the weights and the machine, not on
the calibration settings. It is written to a speed sidecar
``<cache_dir>/<model>-<fingerprint>.speed.json`` (see :func:`speed_path`;
:func:`read_profile` reads it back), and into the ``profile`` field of every score
cache in ``cache_dir`` made for the same weights (same fingerprint), through
``cache.update_cache``. ``plan.latency_model`` uses ``cache.profile`` first; the sidecar
covers plans made without a cache (e.g. ``--method last``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vllm_miprun.core.latency import LatencyModel

SPEED_FORMAT = "vllm-miprun-speed"
SPEED_FORMAT_VERSION = 1
RESULT_MARK = "MIPRUN_SPEED_RESULT "
DEFAULT_KEEPS = (1.0, 0.75, 0.5)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}

_LOG_FIGURES = {  # figure name -> the vLLM 0.32 log line that reports it (CPU and GPU runners)
    "vllm_init_model_s": re.compile(r"Initializing model took ([0-9.]+) seconds"),
    "vllm_load_weights_s": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "vllm_model_load_s": re.compile(r"Model loading took [0-9.]+ GiB memory and ([0-9.]+) seconds"),
    "vllm_model_load_gib": re.compile(r"Model loading took ([0-9.]+) GiB memory"),
    "vllm_init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
}
_MIPRUN_LOAD_LINE = re.compile(r"miprun: built (\d+) of (\d+) blocks.*?load ([0-9.]+) s")


# ----------------------------------------------------------------------------- pure maths

def fit_fixed_and_block(points: Iterable[tuple[int, float]]) -> dict[str, Any]:
    """Least-squares ``seconds = fixed_s + K * block_s`` over ``(K, seconds)`` points.

    Needs at least two distinct K. Returns ``fixed_s``, ``block_s``, the RMS residual
    and ``clamped`` (which constraint, if any, was applied to keep both costs >= 0).
    """
    pts = [(int(k), float(s)) for k, s in points]
    if any(k < 0 or not math.isfinite(s) or s < 0 for k, s in pts):
        raise ValueError(f"points must be (blocks >= 0, seconds >= 0), got {pts}")
    ks = sorted({k for k, _ in pts})
    if len(ks) < 2:
        raise ValueError(
            f"fitting fixed and per-block cost needs two or more distinct block counts, got {ks}; "
            "measure at least two keep ratios (e.g. 1.0 and 0.5)"
        )
    n = len(pts)
    mean_k = sum(k for k, _ in pts) / n
    mean_s = sum(s for _, s in pts) / n
    sxx = sum((k - mean_k) ** 2 for k, _ in pts)
    sxy = sum((k - mean_k) * (s - mean_s) for k, s in pts)
    block = sxy / sxx
    fixed = mean_s - block * mean_k
    clamped = None
    if block < 0:
        block, fixed, clamped = 0.0, mean_s, "block_s<0: set to 0"
    elif fixed < 0:
        block = sum(k * s for k, s in pts) / sum(k * k for k, _ in pts)
        fixed, clamped = 0.0, "fixed_s<0: refit through the origin"
    residual = math.sqrt(sum((s - fixed - block * k) ** 2 for k, s in pts) / n)
    return {"fixed_s": fixed, "block_s": block, "residual_rms_s": residual, "clamped": clamped}


def make_profile(num_blocks: int, batch_size: int, points: Sequence[tuple[int, float]],
                 measured: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored profile: fit ``points`` and repeat the per-block cost ``num_blocks`` times."""
    fit = fit_fixed_and_block(points)
    profile = {
        "batch_size": int(batch_size),
        "fixed_s": fit["fixed_s"],
        "block_s": [fit["block_s"]] * int(num_blocks),
        "source": "profile",
        "measured": {
            **dict(measured or {}),
            "points": [{"kept": int(k), "s_per_token": float(s)} for k, s in points],
            "fit": "latency = fixed_s + K * block_s (least squares, homogeneous blocks)",
            "residual_rms_s": fit["residual_rms_s"],
            "clamped": fit["clamped"],
        },
    }
    LatencyModel.from_profile(profile)  # validates the shape the planner will read
    return profile


def profile_problem(profile: Mapping[str, Any]) -> str | None:
    """Why a fitted profile should not be stored, or None when it is usable.

    A per-block cost of zero (latency did not grow with the block count) means the
    measurements were noise: a planner given it would predict no speed-up at all.
    """
    if not profile["block_s"] or max(profile["block_s"]) <= 0:
        points = ", ".join(f"{p['kept']} blocks: {p['s_per_token'] * 1e3:.2f} ms"
                           for p in profile.get("measured", {}).get("points", []))
        return (f"decode latency did not grow with the number of blocks ({points}); the timings are "
                "noise (a busy machine?): rerun on an idle machine, with more --output-tokens or --repeats")
    return None


def decode_seconds_per_token(t_full: float, t_first: float, output_tokens: int) -> float:
    """Time per output token after the first: ``(T_N - T_1) / (N - 1)``."""
    if output_tokens < 2:
        raise ValueError(f"decode time needs at least 2 output tokens, got {output_tokens}")
    return max(0.0, (t_full - t_first) / (output_tokens - 1))


def _cfg(config: Mapping, key: str, default=None) -> int:
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"model config lacks {key!r}")
    return int(value)


def per_token_costs(config: Mapping, batch_size: int = 1, context_tokens: int = 128,
                    bytes_per_param: float = 2.0) -> dict[str, float]:
    """FLOPs and bytes moved per generated token, split into one block and the rest.

    Per block: ``2 * params`` FLOPs for the q/k/v/o and gated-MLP matmuls plus
    ``4 * context * heads * head_dim`` for attention scores and values; bytes: the block's
    weights read once per decode step and shared by the ``batch_size`` sequences
    (``params * bytes_per_param / batch_size``) plus its K and V cache for ``context``
    tokens. Outside the blocks: the embedding row read (no FLOPs), and the LM head
    (``vocab * hidden`` params: ``2 *`` that in FLOPs, its weights read once per step,
    even when tied to the embeddings). Norms and rotary embeddings are ignored (< 1%).
    """
    hidden = _cfg(config, "hidden_size")
    inter = _cfg(config, "intermediate_size")
    heads = _cfg(config, "num_attention_heads")
    kv_heads = _cfg(config, "num_key_value_heads", heads)
    vocab = _cfg(config, "vocab_size")
    head_dim = int(config.get("head_dim") or hidden // heads)
    block_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    head_params = vocab * hidden
    kv_bytes = 2 * kv_heads * head_dim * context_tokens * bytes_per_param
    return {
        "block_params": float(block_params),
        "lm_head_params": float(head_params),
        "block_flops": 2.0 * block_params + 4.0 * context_tokens * heads * head_dim,
        "block_bytes": block_params * bytes_per_param / batch_size + kv_bytes,
        "rest_flops": 2.0 * head_params,
        "rest_bytes": head_params * bytes_per_param / batch_size + hidden * bytes_per_param,
    }


def ideal_speedup(config: Mapping, kept: int, batch_size: int = 1, context_tokens: int = 128,
                  bytes_per_param: float = 2.0) -> dict[str, float]:
    """Full over pruned per-token cost, counted in FLOPs and in bytes moved.

    ``(rest + L * block) / (rest + K * block)`` with the costs of :func:`per_token_costs`.
    No per-step engine overhead is included: this is the ceiling a pruned model can reach.
    """
    num_blocks = _cfg(config, "num_hidden_layers")
    if not 1 <= kept <= num_blocks:
        raise ValueError(f"kept must be in 1..{num_blocks}, got {kept}")
    c = per_token_costs(config, batch_size, context_tokens, bytes_per_param)
    flops = (c["rest_flops"] + num_blocks * c["block_flops"]) / (c["rest_flops"] + kept * c["block_flops"])
    bytes_ = (c["rest_bytes"] + num_blocks * c["block_bytes"]) / (c["rest_bytes"] + kept * c["block_bytes"])
    return {"flops": flops, "bytes": bytes_}


def kv_bytes_per_token_per_layer(config: Mapping, dtype_bytes: int) -> int:
    """K and V for one token in one attention layer."""
    heads = _cfg(config, "num_attention_heads")
    kv_heads = _cfg(config, "num_key_value_heads", heads)
    head_dim = int(config.get("head_dim") or _cfg(config, "hidden_size") // heads)
    return 2 * kv_heads * head_dim * dtype_bytes


def exact_kv_memory(config: Mapping, dtype_bytes: int, kept: int, at_least: int,
                    page_tokens: int = 128) -> int:
    """Smallest KV memory >= ``at_least`` bytes that holds a whole number of
    ``page_tokens``-token pages for both L and ``kept`` layers, so the KV capacity ratio
    of the pruned model to the full one is exactly ``L / kept`` (no floor rounding)."""
    num_blocks = _cfg(config, "num_hidden_layers")
    unit = kv_bytes_per_token_per_layer(config, dtype_bytes) * page_tokens * math.lcm(num_blocks, kept)
    return unit * max(1, math.ceil(at_least / unit))


def weight_bytes(model_dir: str | Path, kept: Iterable[int] | None, dtype_bytes: int | None = None) -> int:
    """Bytes of the weights a model with only ``kept`` blocks holds (all when None).

    Counted from the safetensors headers: elements of every non-block tensor and of the
    kept blocks, times ``dtype_bytes`` (the run dtype) or the stored element size.
    """
    from vllm_miprun.model import checkpoint
    from vllm_miprun.model.remap import layer_index

    wanted = None if kept is None else set(kept)
    total = 0
    for path in checkpoint.safetensors_files(Path(model_dir)):
        for name, info in checkpoint.read_header(path).items():
            index = layer_index(name)
            if wanted is not None and index is not None and index not in wanted:
                continue
            start, end = info["data_offsets"]
            if dtype_bytes is None:
                total += end - start
            else:
                total += math.prod(info["shape"]) * dtype_bytes
    return total


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        try:
            import torch

            return f"cuda: {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - best effort description
            return "cuda"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- storage

def speed_path(model_dir: str | Path, cache_dir: str | Path | None = None,
               fingerprint: str | None = None) -> Path:
    """The speed sidecar for these weights: ``<cache_dir>/<model>-<fingerprint>.speed.json``."""
    from vllm_miprun import envs
    from vllm_miprun.pipeline.store import safe_name
    from vllm_miprun.model.fingerprint import model_fingerprint

    fingerprint = fingerprint or model_fingerprint(model_dir)
    folder = Path(cache_dir).expanduser() if cache_dir else envs.cache_dir()
    digest = fingerprint.split(":", 1)[-1][:16]
    return folder / f"{safe_name(Path(model_dir).resolve().name)}-{digest}.speed.json"


def read_speed(model_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The speed sidecar's contents for these weights, or None when there is none."""
    from vllm_miprun.model.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(model_dir)
    path = speed_path(model_dir, cache_dir, fingerprint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SPEED_FORMAT or data.get("fingerprint") != fingerprint:
        return None
    return data


def read_profile(model_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The measured profile from the sidecar (``LatencyModel.from_profile`` input), or None."""
    data = read_speed(model_dir, cache_dir)
    profile = data.get("profile") if data else None
    if not profile:
        return None
    try:
        LatencyModel.from_profile(profile)
    except ValueError:
        return None
    return profile


def store_speed(model_dir: str | Path, cache_dir: str | Path | None = None, *,
                profile: Mapping | None = None, throughput: Mapping | None = None) -> list[str]:
    """Write ``profile`` and/or ``throughput`` to the sidecar and to every score cache of
    these weights in ``cache_dir``. Returns the paths written."""
    from filelock import FileLock

    from vllm_miprun.pipeline import store as score_cache
    from vllm_miprun.model.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(model_dir)
    path = speed_path(model_dir, cache_dir, fingerprint)
    score_cache.ensure_writable(path.parent)
    written = []
    with FileLock(str(path) + ".lock", timeout=600):
        data = None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            data = {"format": SPEED_FORMAT, "format_version": SPEED_FORMAT_VERSION,
                    "fingerprint": fingerprint, "model": Path(model_dir).resolve().name}
        if profile is not None:
            data["profile"] = dict(profile)
        if throughput is not None:
            data["throughput"] = dict(throughput)
        score_cache.atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))
    written.append(str(path))

    def update(cache):
        if profile is not None:
            cache.profile = dict(profile)
        if throughput is not None:
            cache.throughput = dict(throughput)

    for candidate in sorted(path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.json")):
        if candidate.name.endswith(".speed.json"):
            continue
        try:
            if score_cache.read_cache(candidate).fingerprint != fingerprint:
                continue
            score_cache.update_cache(candidate, update)
        except score_cache.CacheError:
            continue
        written.append(str(candidate))
    return written


# ----------------------------------------------------------------------------- engines

def measure_engine(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Start one vLLM engine and time it (call in a fresh process; see the module doc).

    Spec keys: model, load_format ("auto" | "miprun"), extra (loader config), dtype,
    kv_bytes, max_model_len, prompts (token-id lists), batch_sizes, output_tokens,
    repeats, enforce_eager.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        load_format=spec.get("load_format", "auto"),
        model_loader_extra_config=spec.get("extra") or {},
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 1024),
        kv_cache_memory_bytes=int(spec["kv_bytes"]),
        enable_prefix_caching=False,
        seed=0,
    )
    construct_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in spec["prompts"]]
    n_out = int(spec.get("output_tokens", 128))
    repeats = int(spec.get("repeats", 3))

    def timed(batch: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        begin = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [max_tokens] * batch:
            raise RuntimeError(f"expected {max_tokens} tokens per prompt, got {got}")
        return elapsed

    batches = [int(b) for b in spec.get("batch_sizes", [1, 4, 16])]
    if max(batches) > len(prompts):
        raise ValueError(f"batch size {max(batches)} needs that many prompts, got {len(prompts)}")
    timed(max(batches), min(8, n_out))  # warm-up: excluded
    by_batch = {}
    for batch in batches:
        firsts = [timed(batch, 1) for _ in range(repeats)]
        fulls = [timed(batch, n_out) for _ in range(repeats)]
        t1, tn = median(firsts), median(fulls)
        by_batch[str(batch)] = {
            "ttft_s": t1,
            "tpot_s": decode_seconds_per_token(tn, t1, n_out),
            "generate_s": tn,
            "output_tokens_per_s": batch * n_out / tn,
            "runs_ttft_s": firsts,
            "runs_generate_s": fulls,
        }
    cache = llm.llm_engine.vllm_config.cache_config
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    result = {
        "construct_s": construct_s,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
        # vLLM's logged "KV cache size": whole blocks per max_model_len request x concurrency
        "vllm_kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "num_hidden_layers": hf_config.num_hidden_layers,
        "kept": getattr(hf_config, "miprun_kept_layers", None),
        "batches": by_batch,
    }
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    return result


def run_engine(spec: Mapping[str, Any], timeout_s: float = 900, env: Mapping[str, str] | None = None,
               log_path: str | Path | None = None) -> dict[str, Any]:
    """:func:`measure_engine` in a fresh ``python -m vllm_miprun.tools.profiling --worker`` process.

    Adds ``process_s`` (subprocess wall time) and, parsed from vLLM's log, the model
    loading time and memory vLLM reports, and the miprun loader's own load seconds.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(dict(spec), handle)
        spec_file = handle.name
    begin = time.perf_counter()
    try:
        returncode, stdout, stderr = _run_in_own_group(
            [sys.executable, "-m", "vllm_miprun.tools.profiling", "--worker", spec_file],
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


def _run_in_own_group(argv: list[str], timeout_s: float, env: Mapping[str, str]) -> tuple[int, str, str]:
    """Run ``argv`` in a new session and kill its whole process group on timeout or
    interrupt: vLLM's EngineCore is a grandchild that would otherwise outlive us."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    # The worker has exited; anything it left in its group is an orphan.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr


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
    """Measure decode latency at each keep ratio, fit the profile, and store it."""
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.core.selection import keep_count

    config = read_config(model_dir)
    num_blocks = _cfg(config, "num_hidden_layers")
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
                     "ttft_s": result["batches"][str(batch_size)]["ttft_s"]})
    profile = make_profile(num_blocks, batch_size, points, measured={
        "measured_by": "vllm-miprun profile",
        "device": device_name(device),
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
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
    """The fitted profile, its measured points and the files written, for a person."""
    profile = result["profile"]
    lines = [f"batch size {profile['batch_size']}: fixed {profile['fixed_s'] * 1e3:.3f} ms + "
             f"{profile['block_s'][0] * 1e3:.3f} ms per block per output token "
             f"(rms residual {profile['measured']['residual_rms_s'] * 1e3:.3f} ms)"]
    lines += [f"  {point['kept']:4d} blocks: {point['s_per_token'] * 1e3:.3f} ms per token"
              for point in profile["measured"]["points"]]
    lines += [f"wrote {path}" for path in result["written"]]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _spec = json.loads(Path(sys.argv[2]).read_text())
        _result = measure_engine(_spec)
        sys.stdout.write(RESULT_MARK + json.dumps(_result) + "\n")
        sys.stdout.flush()
    else:
        sys.exit(profile_main(sys.argv[1:]))
