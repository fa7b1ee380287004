"""The one speed model: predicted per-token decode latency of a pruned model.

Everything that predicts a speed-up asks here: the planner (``pipeline/plan.py``: the
predicted speed-up and latency budgets), the metrics (``miprun_predicted_speedup`` is
the plan's figure), ``vllm-miprun profile`` (prints the estimate beside its fit) and the
benchmarks' "ideal" (``benchmarks/bench_speed.py``, ``bench_serving.py``).

The unit everywhere is seconds per decode step at a stated batch size, i.e. the
per-output-token latency each sequence sees (inter-token latency). A model is
``fixed_s`` (embeddings, final norm, LM head, sampling and per-step overhead) plus one
cost per kept block. It comes either from a measured profile (``source="profile"``,
written by ``vllm-miprun profile`` or the speed benchmark; fitted by
:mod:`vllm_miprun.core.profile_fit`) or, when none exists, from a FLOP-and-byte
estimate built from the Hugging Face config (``source="flop-byte-estimate"``,
:func:`decode_step_costs`).

The estimate's two workload constants are explicit parameters with one default each:

- ``batch_size`` (:data:`DEFAULT_BATCH_SIZE` = 1): sequences decoded together. A
  profile records its own; a budget in ms names it (``12ms@bs8``).
- ``context_tokens`` (:data:`DEFAULT_CONTEXT_TOKENS` = 512): KV entries each sequence
  attends to per step, i.e. a mid-length conversation. The planner has always used 512,
  so plans stay as they were; a benchmark that knows its own workload passes it (the
  speed benchmark passes prompt + half the output, the mean context of its decode steps).

Without a profile only ratios matter, and the context moves them little: at batch 1 on
SmolLM2 the predicted speed-up of keeping 15 of 30 blocks is 1.502x with 128 tokens of
context and 1.512x with 512 (``ideal_speedup(config, 15, 1, 128)["estimate"]``).

Budgets (:func:`parse_latency_budget`) are either a fraction of the full model's latency
(``"0.8"``) or milliseconds per output token at a batch size (``"12ms"``, ``"12ms@bs8"``).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from vllm_miprun import strict_json

SOURCES = ("profile", "flop-byte-estimate")

# Default machine for the estimate: a server CPU running vLLM-CPU in bf16, the project's
# reference setup. Only ratios matter for speed-ups; absolute ms budgets should use a
# measured profile.
DEFAULT_PEAK_FLOPS = 1.0e12  # FLOP/s sustained in GEMMs
DEFAULT_BANDWIDTH = 5.0e10  # bytes/s from memory
DEFAULT_BYTES_PER_PARAM = 2  # bf16 weights
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}  # run dtype -> bytes
DEFAULT_STEP_OVERHEAD_S = 1.0e-3  # scheduler, sampling, framework per decode step
DEFAULT_BATCH_SIZE = 1  # sequences decoded together (see the module docstring)
DEFAULT_CONTEXT_TOKENS = 512  # KV entries each sequence attends to per step (ditto)


@dataclass(frozen=True)
class LatencyModel:
    """``latency(kept) = fixed_s + sum(block_s[b] for b in kept)`` at ``batch_size``."""

    fixed_s: float
    block_s: tuple[float, ...]
    batch_size: int = 1
    source: str = "profile"
    details: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"latency source must be one of {SOURCES}, got {self.source!r}")
        if not _finite_non_negative(self.fixed_s):
            raise ValueError(f"fixed_s must be a finite number >= 0 seconds, got {self.fixed_s!r}")
        if len(self.block_s) < 1 or not all(_finite_non_negative(x) for x in self.block_s):
            raise ValueError(
                f"block_s must be one finite cost >= 0 seconds per block, got {list(self.block_s)!r}; "
                "re-run `vllm-miprun profile MODEL_DIR`"
            )
        _check_batch_size(self.batch_size)
        object.__setattr__(self, "block_s", tuple(float(x) for x in self.block_s))
        object.__setattr__(self, "fixed_s", float(self.fixed_s))

    @property
    def num_blocks(self) -> int:
        return len(self.block_s)

    @property
    def full_s(self) -> float:
        """Latency of the unpruned model."""
        return self.fixed_s + sum(self.block_s)

    def predict(self, kept: Iterable[int]) -> float:
        """Predicted seconds per output token when only ``kept`` blocks run."""
        kept = set(kept)
        bad = [b for b in kept if not (isinstance(b, numbers.Integral) and 0 <= b < self.num_blocks)]
        if bad:
            raise ValueError(
                f"kept blocks must be indices in 0..{self.num_blocks - 1}, got {sorted(bad, key=str)}"
            )
        return self.fixed_s + sum(self.block_s[b] for b in kept)

    def speedup(self, kept: Iterable[int]) -> float:
        """Full-model latency over pruned latency (> 1 means faster)."""
        return self.full_s / self.predict(kept)

    # ----------------------------------------------------------------- profiles

    @classmethod
    def from_profile(cls, profile: Mapping) -> "LatencyModel":
        """Build from a measured profile ``{"batch_size", "fixed_s", "block_s": [...]}``."""
        if not isinstance(profile, Mapping):
            raise ValueError(f"latency profile must be a dict, got {type(profile).__name__}")
        missing = [key for key in ("batch_size", "fixed_s", "block_s") if key not in profile]
        if missing:
            raise ValueError(
                f"latency profile lacks {missing}; expected keys batch_size, fixed_s, block_s. "
                "Re-run `vllm-miprun profile MODEL_DIR`"
            )
        if not isinstance(profile["block_s"], (list, tuple)):
            raise ValueError(f"latency profile block_s must be a list of seconds per block, got "
                             f"{profile['block_s']!r:.80}; re-run `vllm-miprun profile MODEL_DIR`")
        details = {k: v for k, v in profile.items() if k not in ("batch_size", "fixed_s", "block_s", "source")}
        return cls(
            fixed_s=profile["fixed_s"],
            block_s=tuple(profile["block_s"]),
            batch_size=profile["batch_size"],
            source="profile",
            details=details,
        )

    def to_profile(self) -> dict:
        """The dict :meth:`from_profile` reads, plus ``source`` and any details."""
        return {
            **self.details,
            "batch_size": self.batch_size,
            "fixed_s": self.fixed_s,
            "block_s": list(self.block_s),
            "source": self.source,
        }

    # ----------------------------------------------------------------- estimate

    @classmethod
    def from_config(
        cls,
        config: Mapping,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        peak_flops: float = DEFAULT_PEAK_FLOPS,
        bandwidth: float = DEFAULT_BANDWIDTH,
        bytes_per_param: float = DEFAULT_BYTES_PER_PARAM,
        step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ) -> "LatencyModel":
        """FLOP-and-byte fallback from a Hugging Face config dict.

        Costs per decode step come from :func:`decode_step_costs`. Time is
        ``max(flops / peak_flops, bytes / bandwidth)`` (roofline), for one block and for
        the LM head; the fixed cost is the LM head plus ``step_overhead_s``. All blocks
        are identical under this model.
        """
        costs = decode_step_costs(config, batch_size, context_tokens, bytes_per_param)
        block = max(costs["block_flops"] / peak_flops, costs["block_bytes"] / bandwidth)
        head = max(costs["rest_flops"] / peak_flops, costs["rest_bytes"] / bandwidth)
        return cls(
            fixed_s=head + step_overhead_s,
            block_s=(block,) * costs["num_blocks"],
            batch_size=batch_size,
            source="flop-byte-estimate",
            details={
                "peak_flops": peak_flops,
                "bandwidth": bandwidth,
                "bytes_per_param": bytes_per_param,
                "step_overhead_s": step_overhead_s,
                "context_tokens": context_tokens,
                "block_params": costs["block_params"],
                "lm_head_params": costs["lm_head_params"],
                "tie_word_embeddings": bool(text_config(config).get("tie_word_embeddings", False)),
            },
        )

    # ----------------------------------------------------------------- budgets

    def budget_seconds(self, budget) -> float:
        """Seconds per output token for a budget string or :func:`parse_latency_budget` tuple."""
        kind, value, batch_size = parse_latency_budget(budget) if isinstance(budget, str) else budget
        if kind == "fraction":
            return value * self.full_s
        if batch_size != self.batch_size:
            raise ValueError(
                f"budget is {value:g} ms per token at batch size {batch_size}, but the latency "
                f"model is for batch size {self.batch_size}; profile at batch size {batch_size} "
                f"or give the budget as '{value:g}ms@bs{self.batch_size}'"
            )
        return value / 1000.0

    def format_seconds(self, seconds: float, kind: str) -> str:
        """Express a latency in the budget's units (a fraction or ms per token)."""
        if kind == "fraction":
            return f"{seconds / self.full_s:.4f} of the full model's latency"
        return f"{seconds * 1000.0:.4f} ms per token at batch size {self.batch_size}"


# ----------------------------------------------------------------- the estimate's counts

def text_config(config: Mapping) -> Mapping:
    """The language-model part of a (possibly multimodal) Hugging Face config dict."""
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a dict (config.json), got {type(config).__name__}")
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) and "num_hidden_layers" in inner else config


def kv_bytes_per_token_per_block(config: Mapping, dtype_bytes: int) -> int:
    """KV-cache bytes one decoder block stores per token.

    Standard attention stores K and V: ``2 * kv_heads * head_dim * dtype_bytes``.
    Multi-head latent attention (DeepSeek: ``kv_lora_rank``) stores one latent vector
    plus the rope key: ``(kv_lora_rank + qk_rope_head_dim) * dtype_bytes``.
    """
    cfg = text_config(config)
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes!r}")
    if cfg.get("kv_lora_rank"):
        return (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)) * dtype_bytes
    heads = cfg.get("num_attention_heads")
    if not heads:
        raise ValueError("config has no num_attention_heads; cannot size the KV cache")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * int(kv_heads) * int(head_dim) * dtype_bytes


def decode_step_costs(config: Mapping, batch_size: int = DEFAULT_BATCH_SIZE,
                      context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                      bytes_per_param: float = DEFAULT_BYTES_PER_PARAM) -> dict:
    """FLOPs and bytes of one decode step of ``batch_size`` sequences: one block, and the rest.

    Per block: the q/k/v/o projections and the gated MLP (gate, up, down) are read once
    per step and shared by the batch; FLOPs are ``2 * params * batch`` for the matmuls
    plus ``4 * batch * context * heads * head_dim`` for attention scores and values;
    bytes add each sequence's KV-cache read for ``context`` tokens. The rest is the LM
    head (``vocab * hidden`` params; tied embeddings still cost a read). Norms, rotary
    embeddings and the embedding-row lookup are left out (< 0.1% on SmolLM2).
    """
    cfg = text_config(config)
    _check_batch_size(batch_size)
    hidden = _config_int(cfg, "hidden_size")
    intermediate = _config_int(cfg, "intermediate_size")
    heads = _config_int(cfg, "num_attention_heads")
    kv_heads = _config_int(cfg, "num_key_value_heads", default=heads)
    vocab = _config_int(cfg, "vocab_size")
    layers = _config_int(cfg, "num_hidden_layers")
    head_dim = _config_int(cfg, "head_dim", default=None) or hidden // heads

    block_params = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * intermediate
    kv_bytes = kv_bytes_per_token_per_block(cfg, 1) * context_tokens * batch_size * bytes_per_param
    head_params = vocab * hidden
    return {
        "num_blocks": layers,
        "block_params": block_params,
        "lm_head_params": head_params,
        "block_flops": 2.0 * block_params * batch_size + 4.0 * batch_size * context_tokens * heads * head_dim,
        "block_bytes": block_params * bytes_per_param + kv_bytes,
        "rest_flops": 2.0 * head_params * batch_size,
        "rest_bytes": head_params * bytes_per_param,
    }


def mean_decode_context(prompt_tokens: int, output_tokens: int) -> int:
    """KV entries a sequence attends to per decode step, on average over a request that
    generates ``output_tokens`` after a ``prompt_tokens`` prompt: prompt + output / 2."""
    return int(prompt_tokens) + int(output_tokens) // 2


def ideal_speedup(config: Mapping, kept: int, batch_size: int = DEFAULT_BATCH_SIZE,
                  context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                  bytes_per_param: float = DEFAULT_BYTES_PER_PARAM) -> dict[str, float]:
    """Full over pruned per-token cost for ``kept`` of L blocks, three ways.

    ``flops`` and ``bytes``: ``(rest + L * block) / (rest + K * block)`` with the counts of
    :func:`decode_step_costs` and no per-step engine overhead (the ceiling a pruned model
    can reach). ``estimate``: what the planner predicts without a profile,
    :meth:`LatencyModel.from_config` at the same workload (roofline plus overhead).
    """
    costs = decode_step_costs(config, batch_size, context_tokens, bytes_per_param)
    num_blocks = costs["num_blocks"]
    if isinstance(kept, bool) or not isinstance(kept, numbers.Integral) or not 1 <= kept <= num_blocks:
        raise ValueError(f"kept must be a block count in 1..{num_blocks}, got {kept!r}")

    def ratio(rest: float, block: float) -> float:
        return (rest + num_blocks * block) / (rest + kept * block)

    estimate = LatencyModel.from_config(config, batch_size, bytes_per_param=bytes_per_param,
                                        context_tokens=context_tokens)
    return {
        "flops": ratio(costs["rest_flops"], costs["block_flops"]),
        "bytes": ratio(costs["rest_bytes"], costs["block_bytes"]),
        "estimate": estimate.speedup(range(kept)),
    }


_MS_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*ms\s*(?:@\s*bs\s*([0-9]+))?\s*$", re.I)


def parse_latency_budget(spec) -> tuple[str, float, int | None]:
    """Parse a latency budget.

    - ``"0.8"`` or ``0.8``: ``("fraction", 0.8, None)`` -- a fraction in (0, 1] of the
      full model's per-token latency.
    - ``"12ms"``: ``("ms", 12.0, 1)``; ``"12ms@bs8"``: ``("ms", 12.0, 8)`` -- milliseconds
      per output token at a batch size (default 1).
    """
    hint = "pass e.g. --miprun-latency-budget 0.8 (fraction of full latency) or 12ms@bs8"
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return ("fraction", _check_fraction(float(spec), hint), None)
    if not isinstance(spec, str):
        raise ValueError(f"latency budget must be a string or number, got {spec!r}; {hint}")
    match = _MS_PATTERN.match(spec)
    if match:
        ms = float(match.group(1))
        batch_size = int(match.group(2)) if match.group(2) else 1
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"latency budget must be > 0 ms, got {spec!r}; {hint}")
        _check_batch_size(batch_size)
        return ("ms", ms, batch_size)
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"cannot read latency budget {spec!r}; {hint}") from None
    return ("fraction", _check_fraction(value, hint), None)


def _check_fraction(value: float, hint: str) -> float:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"latency budget fraction must be in (0, 1], got {value}; {hint}")
    return value


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


MAX_CONFIG_INT = 2**40  # a size beyond any model's: float arithmetic on it must stay finite


def _finite_non_negative(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and strict_json.is_finite(x) and x >= 0


def _config_int(config: Mapping, key: str, default=...):
    value = config.get(key)
    if value is None:  # absent, or null in config.json
        if default is ...:
            raise ValueError(f"model config lacks {key!r}, which the speed estimate needs")
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_CONFIG_INT:
        raise ValueError(f"model config {key!r} must be a positive integer, got {str(value)[:40]} (at most 2**40)")
    return int(value)
