"""Calibration: text -> block-by-block forward -> boundary statistics -> scores -> cache.

One pass over the calibration batch, one block at a time, keeps only what the scores
need from each boundary state: a seeded subsample of token rows for the MI estimator,
each sequence's last token for the angular distance, and the running cosine between
consecutive states for ShortGPT. The full activations of one boundary are all that is
ever held, besides the embeddings and the block that is running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_miprun.pipeline import store as score_cache
from vllm_miprun.core import scoring
from vllm_miprun.core.matrices import to_nested_list
from vllm_miprun.model import architectures
from vllm_miprun.model.blockwise import BlockwiseModel, TensorIndex
from vllm_miprun.model.checkpoint import ModelFolderError, missing_shards, read_config
from vllm_miprun.model.quantization import check_checkpoint_quantization
from vllm_miprun.model.stream import checkpoint_dtype, compute_dtype
from vllm_miprun.pipeline import hub_alias
from vllm_miprun.options import CalibrationSettings, resolve_device

logger = logging.getLogger(__name__)


# MI-PRUN's search measures its bound on the first SEARCH_WINDOWS calibration windows
# (pipeline.forward_search). Calibration runs them through each block as a batch of their own,
# the batch the search runs, so their boundary states are the search's to the last bit, and a
# plan that calibrates hands them over instead of the search running the full model again.
SEARCH_WINDOWS = 2


@dataclass
class BoundaryStats:
    mi_states: list[torch.Tensor]      # L+1 x [mi_tokens, d]
    last_tokens: list[torch.Tensor]    # L+1 x [samples, d]
    block_influence: list[float]       # L
    search_states: list[torch.Tensor] | None = None  # L+1 x [SEARCH_WINDOWS, seq_len, d], when asked


@dataclass(frozen=True)
class SearchStart:
    """What a calibration that just ran gives MI-PRUN's search: the calibration windows
    [samples, seq_len] and the boundary states of the first SEARCH_WINDOWS of them."""
    input_ids: torch.Tensor
    states: list[torch.Tensor]


@dataclass(frozen=True)
class CalibrationResult:
    cache: score_cache.ScoreCache
    path: Path
    reused: bool
    search_start: SearchStart | None = None  # only from a pass this call ran, and only when asked


# The compute that caches made before the key named it were keyed as: the CPU's float32.
# Its key keeps the old form, so those caches stay readable; a GPU cache that older code
# filed under it is refused by :func:`check_compute` (its recorded dtype differs).
LEGACY_COMPUTE = "cpu-float32"


def calibration_key(settings: CalibrationSettings, compute: str = LEGACY_COMPUTE) -> dict:
    """Everything that defines a cache entry: the settings, the estimator's parameters and
    the compute (device type and dtype: a bfloat16 GPU pass and a float32 CPU pass differ
    in the last bits, enough to flip near-tied plans)."""
    key = {**settings.to_json(), "estimator_params": scoring.estimator_params(settings.estimator)}
    return key if compute == LEGACY_COMPUTE else {**key, "compute": compute}


def compute_identity(model_dir: str | Path, device: str, dtype: torch.dtype | None = None) -> str:
    """``<device type>-<dtype>`` the blocks run in for ``device`` (``auto`` resolved):
    ``cpu-float32``, or e.g. ``cuda-bfloat16`` (the checkpoint's dtype on an accelerator)."""
    kind = torch.device(resolve_device(device)).type
    if dtype is None and kind == "cpu":
        return LEGACY_COMPUTE  # compute_dtype's CPU rule, without reading a header
    resolved = compute_dtype(kind, _stored_dtype(model_dir), dtype)
    return f"{kind}-{str(resolved).removeprefix('torch.')}"


def _stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The checkpoint's dtype from its headers; from ``config.json`` when shards are missing
    (a hub snapshot fetched in part, planned through its hub alias)."""
    if hub_alias.has_every_shard(model_dir):
        return checkpoint_dtype(TensorIndex(model_dir).stored_dtype.values())
    config = read_config(model_dir)
    named = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"), None)
    return named if isinstance(named, torch.dtype) else torch.float32


def check_compute(cache: score_cache.ScoreCache, compute: str, path: Path) -> None:
    """Refuse a cache whose recorded compute dtype is not this run's (an old GPU cache
    filed under the CPU key): its scores could give another plan than this run's."""
    recorded = cache.model.get("compute_dtype")
    kind, _, dtype = compute.partition("-")
    if recorded is not None and recorded != dtype:
        raise score_cache.CacheError(
            f"score cache {path} was calibrated in {recorded}, this run calibrates in {dtype} on {kind}; "
            "recalibrate (`vllm-miprun calibrate --force`) or delete the file"
        )


def locate(model_dir: str | Path, settings: CalibrationSettings,
           cache_dir: str | Path | None = None, compute: str = LEGACY_COMPUTE) -> tuple[Path, str]:
    """Where the cache for these weights and settings lives, and the weights' fingerprint.

    A hub snapshot with every shard records its alias here (commit -> fingerprint); one
    fetched in part finds its fingerprint through that alias (see ``hub_alias``)."""
    fingerprint = hub_alias.weights_fingerprint(model_dir, cache_dir)
    return score_cache.cache_path(model_dir, fingerprint, calibration_key(settings, compute), cache_dir), fingerprint


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(
            f"{model_dir} has no usable tokenizer ({type(err).__name__}); calibration needs "
            "tokenizer.json or tokenizer_config.json in the model folder"
        ) from None


def calibration_ids(model_dir: str | Path, settings: CalibrationSettings) -> torch.Tensor:
    from vllm_miprun.pipeline.corpora import sample_token_windows

    tokenizer = load_tokenizer(model_dir)
    windows = sample_token_windows(tokenizer, settings.dataset, settings.samples, settings.seq_len, settings.seed)
    return torch.from_numpy(windows)


def calibrate(model_dir: str | Path, settings: CalibrationSettings, device: str = "cpu",
              cache_dir: str | Path | None = None, force: bool = False, progress: bool = True,
              dtype: torch.dtype | None = None, keep_search_start: bool = False) -> CalibrationResult:
    """Return the cached scores for these weights and settings, computing them if needed.

    ``dtype`` is the blocks' compute dtype; None keeps the checkpoint's dtype on an
    accelerator and uses float32 on the CPU (the statistics are float32/float64 either way).
    ``keep_search_start``: a pass run here also returns its :class:`SearchStart` (a plan about
    to run MI-PRUN's search; the states cost SEARCH_WINDOWS windows' activations per boundary).
    """
    architectures.for_config(read_config(model_dir))  # not a model, or unsupported: refused before any work
    check_checkpoint_quantization(model_dir, read_config(model_dir))  # not a model / unreadable format
    compute = compute_identity(model_dir, device, dtype)
    path, fingerprint = locate(model_dir, settings, cache_dir, compute)
    key = calibration_key(settings, compute)
    if path.exists() and not force:
        cache = score_cache.read_cache(path, fingerprint, key)
        check_compute(cache, compute, path)
        return CalibrationResult(cache, path, reused=True)
    if not hub_alias.has_every_shard(model_dir):  # known through its hub alias, but not on disk
        raise hub_alias.MissingWeightsError(
            f"{model_dir} lacks the shards {missing_shards(model_dir)} and has no score cache at "
            f"{path}; calibration reads every block, so fetch every shard first"
        )
    score_cache.ensure_writable(path.parent)  # fail before the expensive pass
    with score_cache.compute_lock(path):
        if path.exists() and not force:  # another process calibrated while this one waited
            return CalibrationResult(score_cache.read_cache(path, fingerprint, key), path, reused=True)
        start = time.perf_counter()
        cache, search_start = _calibration_pass(model_dir, settings, fingerprint, resolve_device(device), progress,
                                                dtype, keep_search_start)
        score_cache.write_cache(path, cache)
    logger.info("wrote score cache %s (calibrated in %.1f s)", path, time.perf_counter() - start)
    return CalibrationResult(cache, path, reused=False, search_start=search_start)


def compute_scores(model_dir: str | Path, settings: CalibrationSettings, fingerprint: str,
                   device: str = "cpu", progress: bool = True,
                   dtype: torch.dtype | None = None) -> score_cache.ScoreCache:
    return _calibration_pass(model_dir, settings, fingerprint, device, progress, dtype, False)[0]


def _calibration_pass(model_dir: str | Path, settings: CalibrationSettings, fingerprint: str, device: str,
                      progress: bool, dtype: torch.dtype | None,
                      keep_search_start: bool) -> tuple[score_cache.ScoreCache, SearchStart | None]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    input_ids = calibration_ids(model_dir, settings)
    timings["tokenize_s"] = time.perf_counter() - started

    params = scoring.estimator_params(settings.estimator)
    tic = time.perf_counter()
    model = BlockwiseModel(model_dir, device=device, dtype=dtype)
    compute = f"{torch.device(device).type}-{str(model.dtype).removeprefix('torch.')}"
    stats = collect_boundary_stats(model, input_ids, params["mi_tokens"], settings.seed, progress,
                                   keep_search_states=keep_search_start)
    timings["forward_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    span = scoring.span_mi_matrix(stats.mi_states, settings.estimator, params)
    skip_mi = scoring.extra_span_scores(stats.mi_states)["skip_mi_iso"]
    timings["span_mi_s"] = time.perf_counter() - tic
    angular = scoring.angular_matrix(stats.last_tokens)
    timings["total_s"] = time.perf_counter() - started

    num_blocks = model.num_blocks
    config = read_config(model_dir)
    search_start = SearchStart(input_ids, stats.search_states) if keep_search_start else None
    return score_cache.ScoreCache(
        fingerprint=fingerprint,
        model={
            "name": Path(model_dir).resolve().name,
            "architecture": (config.get("architectures") or ["unknown"])[0],
            "num_blocks": num_blocks,
            "hidden_size": config.get("hidden_size"),
            "compute_dtype": str(model.dtype).removeprefix("torch."),
            "compute_device": compute.partition("-")[0],
        },
        calibration=calibration_key(settings, compute),
        estimator={"name": settings.estimator, **params, "units": "nats"},
        block_scores=[float(span[b, b + 1]) for b in range(num_blocks)],
        span_scores=to_nested_list(span),
        baselines={"block_influence": stats.block_influence, "angular": to_nested_list(angular),
                   "skip_mi_iso": to_nested_list(skip_mi)},
        timings=timings,
    ), search_start


def collect_boundary_stats(model: BlockwiseModel, input_ids: torch.Tensor, mi_tokens: int, seed: int,
                           progress: bool = True, keep_search_states: bool = False) -> BoundaryStats:
    """Run the batch through every block once and keep what the scores need (and, when
    ``keep_search_states``, the first SEARCH_WINDOWS windows' states)."""
    samples, seq_len = input_ids.shape
    rows = _mi_rows(samples, seq_len, mi_tokens, seed)
    hidden = model.embed_tokens(input_ids)
    stats = BoundaryStats([], [], [], [] if keep_search_states else None)
    _keep_boundary(stats, hidden, rows)
    for index in tqdm(range(model.num_blocks), desc="calibrating blocks", disable=not progress):
        with model.block(index) as layer:
            nxt = _run_block_search_windows_apart(model, layer, hidden)
        stats.block_influence.append(1.0 - scoring.mean_cosine(hidden.flatten(0, 1), nxt.flatten(0, 1)))
        hidden = nxt
        _keep_boundary(stats, hidden, rows)
    return stats


def _run_block_search_windows_apart(model: BlockwiseModel, layer, hidden: torch.Tensor) -> torch.Tensor:
    """The block on the first SEARCH_WINDOWS windows as one batch, then on the rest: a kernel
    may round a row differently in a batch of another size (see SEARCH_WINDOWS)."""
    head = model.run_block(layer, hidden[:SEARCH_WINDOWS])
    if hidden.shape[0] <= SEARCH_WINDOWS:
        return head
    return torch.cat([head, model.run_block(layer, hidden[SEARCH_WINDOWS:])])


def _mi_rows(samples: int, seq_len: int, mi_tokens: int, seed: int) -> torch.Tensor:
    """Seeded token rows for the MI estimator, never position 0.

    The first position of every sequence is an attention sink with outsized activations;
    it would dominate every covariance while saying nothing about the block.
    """
    candidates = torch.arange(samples * seq_len).view(samples, seq_len)[:, 1:].flatten()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(candidates), generator=generator)[: min(mi_tokens, len(candidates))]
    return candidates[order.sort().values]


def _keep_boundary(stats: BoundaryStats, hidden: torch.Tensor, rows: torch.Tensor) -> None:
    """Keep the rows in float32 on the calibration device: the span statistics run there."""
    flat = hidden.flatten(0, 1)
    stats.mi_states.append(flat[rows.to(flat.device)].float().clone())
    stats.last_tokens.append(hidden[:, -1].float().clone())
    if stats.search_states is not None:
        stats.search_states.append(hidden[:SEARCH_WINDOWS].clone())

