"""Where a served model's files are: a local folder, or a hub id fetched the way vLLM does.

A hub id (``org/model``) goes through vLLM's own download path (``hf_api()``,
``get_lock``, ``download_weights_from_hf``, ``maybe_download_from_modelscope``), with the
engine's ``--revision``, ``--download-dir`` and ``--ignore-patterns``, and
``HF_HUB_OFFLINE`` turning every call into a cache lookup. It is fetched in steps:

1. the small files: ``config.json``, the safetensors index, the tokenizer;
2. the plan. A plan that needs no scores (the score-free methods ``last`` and ``random``,
   or an explicit drop list) is made from the config and index alone. Scores are keyed by
   the weights' fingerprint, which samples every tensor; a hub snapshot is also known by
   its commit, which needs no weights (``pipeline/hub_alias.py``). So a plan that needs
   scores downloads nothing more when a hub alias (commit -> fingerprint, written the
   first time a complete snapshot of that commit was scored) and a matching score cache
   exist in the cache folder: a restart, or a replica with its own download folder that
   shares the cache folder. Otherwise it downloads every shard first, exactly as the
   default loader would, scores them and records the alias for the next time. Healing
   (``heal``) fits on every block's calibration states, so it always downloads every
   shard. A plan made without the weights that turns out to need them (a forward search
   whose answer the cache lacks) downloads every shard and plans again
   (:func:`plan_or_fetch_all`);
3. the shards that hold kept-block or non-block tensors, by name. A shard that holds only
   pruned blocks' tensors is never downloaded.

The front process (``engine_args``) and the worker's loader both build a ``ModelSource``
from the same engine settings and plan through :func:`plan_source`, so they agree on the
folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vllm.logger import init_logger

from vllm_miprun.errors import ModelFolderError
from vllm_miprun.model import checkpoint, weights
from vllm_miprun.model.checkpoint import INDEX_NAME, check_shards, missing_shards, read_config, read_weight_map
from vllm_miprun.model.remap import layer_index
from vllm_miprun.pipeline.hub_alias import MissingWeightsError, has_every_shard, snapshot_id

# Under "vllm." so vLLM's logging config (handler, level, format) applies to it.
logger = init_logger(f"vllm.{__name__}")

# Small files the plan and calibration read: config, safetensors index, generation config,
# tokenizer. Weights are fetched separately.
METADATA_PATTERNS = ["*.json", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]
WEIGHT_PATTERNS = ["*.safetensors"]


@dataclass(frozen=True)
class ModelSource:
    """A model as the engine names it, with the settings vLLM downloads it with."""

    model: str
    revision: str | None = None
    download_dir: str | None = None
    ignore_patterns: tuple[str, ...] = ()

    @classmethod
    def from_engine_args(cls, engine_args) -> "ModelSource":
        return cls(engine_args.model, engine_args.revision, engine_args.download_dir,
                   _patterns(engine_args.ignore_patterns))

    @classmethod
    def from_configs(cls, model_config, load_config) -> "ModelSource":
        return cls(model_config.model, model_config.revision, load_config.download_dir,
                   _patterns(load_config.ignore_patterns))

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.model).expanduser()
        return path if path.is_dir() else None


def _patterns(value) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def plan_needs_scores(options) -> bool:
    """Whether planning reads scores: any method but the score-free ones, unless a drop list."""
    from vllm_miprun.pipeline.plan import SCORE_FREE_METHODS

    return not getattr(options, "drop", None) and options.method not in SCORE_FREE_METHODS


def plan_needs_all_weights(options) -> bool:
    """Whether planning reads every block's weights whatever is cached: healing fits on
    calibration states."""
    return getattr(options, "heal", "none") != "none"


def fetch_for_plan(source: ModelSource, options) -> Path:
    """The folder to plan from: metadata only, or every shard when the plan needs the
    weights (see the module doc). A local folder is never fetched: lacking shards the
    plan needs is an error."""
    from vllm_miprun.pipeline.plan import scores_cached_for_commit

    folder = fetch_metadata(source)
    if plan_needs_all_weights(options):
        reason = "heal fits on the calibration states of every block"
    elif not plan_needs_scores(options):
        return folder
    elif scores_cached_for_commit(folder, options):
        if not has_every_shard(folder):
            logger.info("miprun: scores for %s are cached for its commit (hub alias); planning without its "
                        "weights, so only the shards the kept blocks need are fetched", source.model)
        return folder
    else:
        reason = f"method {options.method} needs scores, and scores need every shard"
        if snapshot_id(folder) is not None:
            reason += " until a complete copy of this hub commit was scored with this cache folder (its hub alias)"
    if source.local_dir is not None:
        missing = missing_shards(folder)
        if missing:
            raise ModelFolderError(f"{folder} lacks the shards {missing}, but {reason}; fetch them, or plan "
                                   "with a drop list or method last/random")
        return folder
    logger.info("miprun: downloading every shard of %s first: %s", source.model, reason)
    return fetch_all_weights(source)


def plan_or_fetch_all(source: ModelSource, model_dir: Path, plan_for: Callable[[Path], Any]) -> tuple[Path, Any]:
    """``(folder, plan_for(folder))``. A plan made from a hub snapshot's cached scores that
    turns out to read weights the snapshot lacks (``MissingWeightsError``: a forward search
    the cache has no answer for) downloads every shard and plans again; a local folder's
    error stands."""
    try:
        return model_dir, plan_for(model_dir)
    except MissingWeightsError as err:
        if source.local_dir is not None:
            raise
        logger.info("miprun: downloading every shard of %s and planning again: %s", source.model, err)
    folder = fetch_all_weights(source)
    return folder, plan_for(folder)


@dataclass(frozen=True)
class SourcePlan:
    """A planned source: its folder, the plan, the config it was made with, and the
    seconds spent in ``plan_for`` (calibration included, downloads not)."""

    folder: Path
    plan: Any
    hf_config: dict[str, Any]
    plan_seconds: float


def plan_source(source: ModelSource, options, plan_for: Callable[[Path, dict[str, Any]], Any],
                overrides: Mapping[str, Any] | None = None) -> SourcePlan:
    """Fetch what the plan needs, plan, then fetch the kept blocks' shards (steps 1-3 of
    the module doc): the one sequence of the front process and of a worker that plans.
    ``overrides``' flat fields (the engine's ``hf_overrides``) are applied to the config."""
    folder = fetch_for_plan(source, options)
    check_shards(folder)  # a damaged shard is refused here, before any plan, fingerprint or engine
    hf_config = read_config(folder)
    hf_config.update({key: value for key, value in (overrides or {}).items() if not isinstance(value, dict)})
    seconds = 0.0

    def timed_plan(where: Path):
        nonlocal seconds
        start = time.perf_counter()
        try:
            return plan_for(where, hf_config)
        finally:
            seconds += time.perf_counter() - start

    folder, plan = plan_or_fetch_all(source, folder, timed_plan)
    folder = fetch_kept_shards(source, folder, plan.kept)
    if source.local_dir is None:
        check_shards(folder)  # the shards fetched just now
    return SourcePlan(folder, plan, hf_config, seconds)


def fetch_metadata(source: ModelSource) -> Path:
    """``config.json``, the safetensors index and the tokenizer (a local folder as is)."""
    if source.local_dir is not None:
        return source.local_dir
    return _snapshot(source, METADATA_PATTERNS)


def fetch_all_weights(source: ModelSource) -> Path:
    """Every shard, through vLLM's ``download_weights_from_hf`` as the default loader does."""
    from vllm import envs
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

    if envs.VLLM_USE_MODELSCOPE:
        return _snapshot(source, WEIGHT_PATTERNS)
    try:
        folder = download_weights_from_hf(source.model, source.download_dir, list(WEIGHT_PATTERNS),
                                          source.revision, ignore_patterns=list(source.ignore_patterns) or None)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise _fetch_error(source, WEIGHT_PATTERNS, err) from None
    return Path(folder)


def shard_split(model_dir: str | Path, kept) -> tuple[list[str], list[str]]:
    """(shards to fetch, shards holding only pruned blocks' tensors), from the index alone.

    Without an index the checkpoint is one file, and it is always needed. Layers past the
    stack (index >= ``num_hidden_layers``: DeepSeek-V3's multi-token-prediction layer) are
    no block of it and are never pruned: an MTP draft reads them from the same snapshot."""
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return list(WEIGHT_PATTERNS), []
    weight_map = read_weight_map(model_dir)
    wanted, depth = set(kept), int(read_config(model_dir)["num_hidden_layers"])

    def is_needed(name: str) -> bool:
        block = layer_index(name)
        return block is None or block in wanted or block >= depth

    needed = {shard for name, shard in weight_map.items() if is_needed(name)}
    return sorted(needed), sorted(set(weight_map.values()) - needed)


def index_total_bytes(model_dir: str | Path) -> int | None:
    """The index's ``metadata.total_size`` (tensor bytes of every shard), if it has one."""
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return None
    metadata = checkpoint.read_index(model_dir).get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    return int(total) if isinstance(total, (int, float, str)) and str(total).isdigit() else None


def fetch_kept_shards(source: ModelSource, model_dir: Path, kept) -> Path:
    """Fetch the shards the kept blocks need; check they are all on disk afterwards."""
    needed, skipped = shard_split(model_dir, kept)
    model_dir = _fetch_shards(source, model_dir, needed, "the kept blocks")
    if skipped and source.local_dir is None:
        logger.info("miprun: fetched %d of %d shards of %s; never downloaded (pruned blocks only): %s",
                    len(needed), len(needed) + len(skipped), source.model, skipped)
    return model_dir


def fetch_outside_stack(source: ModelSource) -> list[Path] | None:
    """The shards holding a tensor outside the decoder stack (embeddings, head, layers past
    it), fetched by name: all that a draft reading no block of the stack needs (an MTP
    layer). None where that is every shard (one file, or no shard of blocks only)."""
    model_dir = fetch_metadata(source)
    needed, blocks_only = shard_split(model_dir, ())
    if not blocks_only:
        return None
    folder = _fetch_shards(source, model_dir, needed, "the tensors outside the decoder stack")
    return [folder / name for name in needed]


def _fetch_shards(source: ModelSource, model_dir: Path, needed: list[str], reader: str) -> Path:
    """Fetch shards by name (a local folder as is); check they are all on disk afterwards."""
    if source.local_dir is None:
        model_dir = _snapshot(source, needed)
    missing = [name for name in needed if "*" not in name and not (model_dir / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"{source.model} lacks the shards {missing} that {reader} need (ignore_patterns "
            f"{list(source.ignore_patterns)}); fetch them or change --ignore-patterns"
        )
    return model_dir


def resolve_model_dir(model: str | ModelSource, revision: str | None = None) -> Path:
    """The folder of a model whose files were already fetched (the worker, the metrics)."""
    source = model if isinstance(model, ModelSource) else ModelSource(model, revision)
    return fetch_metadata(source)


def _snapshot(source: ModelSource, allow_patterns: list[str]) -> Path:
    """One ``snapshot_download`` through vLLM's hub client, lock and offline switch."""
    import huggingface_hub.constants
    from vllm.model_executor.model_loader.weight_utils import (
        DisabledTqdm, get_lock, maybe_download_from_modelscope)
    from vllm.transformers_utils.repo_utils import hf_api

    ignore = list(source.ignore_patterns) or None
    try:
        from_modelscope = maybe_download_from_modelscope(
            source.model, source.revision, source.download_dir, ignore, allow_patterns)
        if from_modelscope:
            return Path(from_modelscope)
        with get_lock(source.model, source.download_dir):
            folder = hf_api().snapshot_download(
                source.model, allow_patterns=allow_patterns, ignore_patterns=ignore,
                cache_dir=source.download_dir, revision=source.revision, tqdm_class=DisabledTqdm,
                local_files_only=huggingface_hub.constants.HF_HUB_OFFLINE,
            )
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise _fetch_error(source, allow_patterns, err) from None
    return Path(folder)


def _fetch_error(source: ModelSource, patterns, err: Exception) -> ModelFolderError:
    import huggingface_hub.constants

    where = "the local hub cache (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else "the hub"
    first_line = (str(err).strip().splitlines() or [""])[0]
    return ModelFolderError(
        f"miprun could not fetch {patterns} of {source.model!r} (revision {source.revision or 'default'}) "
        f"from {where}: {type(err).__name__}: {first_line}; expected a local folder or a hub id "
        "that is cached or reachable"
    )


def plan_kept_reads(model_dir: str | Path, kept) -> tuple[list[Path], int, int]:
    """(shards to open, bytes to read, bytes skipped) for serving ``kept`` from ``model_dir``.

    Shards holding only pruned blocks may never have been fetched (a hub snapshot planned from
    cached scores): their bytes come from the index's total, never from their headers."""
    _, never_fetched = shard_split(model_dir, kept)
    shards = [path for path in checkpoint.safetensors_files(model_dir) if path.name not in never_fetched]
    files, read_bytes, skipped_bytes = weights.plan_reads(shards, kept)
    if never_fetched:
        total = index_total_bytes(model_dir)
        if total is not None:
            skipped_bytes = max(total - read_bytes, skipped_bytes)
    return files, read_bytes, skipped_bytes
