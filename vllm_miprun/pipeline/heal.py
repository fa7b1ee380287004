"""Load-time healing (``heal=linear`` or ``distill``): fit, store and fold one linear map per pruned run.

Each maximal pruned run ``[i, j)`` gets a map ``T`` on the MLP output of block ``i−1``
(``vllm_miprun.core.heal_math`` has the algebra), fitted on calibration tokens
(``pipeline.heal_fit``): by least squares against the full model's ``h_j``, and for
``distill`` then all together on the full model's next-token distribution. The maps are folded into ``down_proj`` (or, where the family's
``heal_site`` says so, the post-feed-forward norm's gain) as the kept tensors stream to the
model (``fold_stream``), so the served model has the same K blocks and shapes as the
unhealed one: no serving cost.

Maps are stored beside the score cache as safetensors (never pickle). The file's metadata
records the weights' fingerprint, the calibration settings, the recipe and the plan; a
file whose record differs is refused. A damaged file (cut, garbled) is fitted again with a
warning, or refused in one line under ``require_cache``: the maps are derived data that
the file name already keys by that record, so damage there is a killed or failed write,
never a user's choice, and refitting costs no more than the first load. Files are written
by the cache folder's one atomic, fsynced writer (``store.atomic_write_bytes``).
The recipes come from ``benchmarks/heal_research.py`` and ``heal_kl_research.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from vllm_miprun.core import heal_math
from vllm_miprun.errors import CacheError
from vllm_miprun.model.architectures.base import HealSite
from vllm_miprun.model.remap import layer_index
from vllm_miprun.options import resolve_device

logger = logging.getLogger(__name__)

HEAL_FORMAT = "miprun-heal"
HEAL_VERSION = 1
# The research's choice for the opt-in (benchmarks/results/heal_research.md), made on
# validation text unlike calibration: one scale per channel (the full ridge map made code
# 31% worse at keep 0.6; the diagonal made no domain worse); calibration text from ``wiki``
# and ``c4`` together; each run fitted on the full model's states (independent): fitting
# on the healed prefix (sequential) hurt held-out text badly at keep 0.6.
RECIPE: dict[str, Any] = {"form": "diag", "ridge": 0.0, "weights": "uniform", "sequential": False,
                          "mix": ["wiki", "c4"]}
# heal=distill (pipeline.heal_fit, benchmarks/heal_kl_research.py): a full map with the
# ridge chosen for it on validation, then trained on the next-token KL; one scale per channel
# where only a diagonal folds (a norm's gain, FP8 scales).
DISTILL: dict[str, Any] = {**RECIPE, "form": "full", "ridge": 0.01, "objective": "kl", "steps": 100, "batch": 2,
                           "lr": {"full": 2e-4, "diag": 1e-2}}
_SCALE_LEAVES = ("weight_scale", "weight_scale_inv")
EMBED = "model.embed_tokens.weight"


class HealError(CacheError):
    """Stored heal maps are missing, corrupt, or belong to other weights, settings or plans."""


class DamagedMapsError(HealError):
    """A stored heal-map file cannot be read: cut, garbled, not safetensors."""


# --------------------------------------------------------------------------- store


def json_digest(value: Any, length: int = 16) -> str:
    """A short sha256 of ``value``'s JSON, key order ignored: what names maps and measurements."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def recipe_for(mode: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fit of ``heal=mode``; ``distill`` takes a full map only where one folds exactly."""
    if mode != "distill":
        return RECIPE
    from vllm_miprun.model.quantization import quant_method

    diagonal_only = config is not None and (heal_site(config).folds_into_norm or quant_method(config) is not None)
    return {**DISTILL, "form": "diag", "ridge": 0.0} if diagonal_only else DISTILL


def recipe_digest(mode: str = "linear") -> str:
    """The recipe's identity: anything measured with the heal is stored under it."""
    return json_digest(recipe_for(mode), 12)


def heal_record(fingerprint: str, calibration: dict[str, Any], kept: list[int], num_blocks: int,
                recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the stored maps depend on; any difference means other maps."""
    return {"format": HEAL_FORMAT, "version": HEAL_VERSION, "fingerprint": fingerprint,
            "calibration": calibration, "recipe": RECIPE if recipe is None else recipe, "kept": list(kept),
            "num_blocks": num_blocks}


def heal_path(model_dir: str | Path, record: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    from vllm_miprun.pipeline.store import cache_folder, safe_name

    folder = cache_folder(cache_dir)
    return folder / f"{safe_name(Path(model_dir).resolve().name)}-heal-{json_digest(record)}.safetensors"


def write_maps(path: Path, record: dict[str, Any], maps: dict[int, torch.Tensor]) -> Path:
    """Atomically write ``{run start: T}`` with ``record`` as safetensors metadata."""
    from safetensors.torch import save

    from vllm_miprun.pipeline.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"map.{start}": t.float().contiguous() for start, t in maps.items()}
    atomic_write_bytes(path, save(tensors, metadata={"miprun": json.dumps(record, sort_keys=True)}))
    return path


def read_maps(path: Path, record: dict[str, Any], width: int | None = None) -> dict[int, torch.Tensor]:
    """The maps in ``path``, refused unless they were made for exactly ``record`` (and,
    given ``width``, the model's hidden size, are that wide)."""
    from safetensors import SafetensorError, safe_open

    from vllm_miprun.model.checkpoint import read_shard_header

    try:
        read_shard_header(path)  # cut or garbled: refused before safetensors maps it
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = json.loads((handle.metadata() or {}).get("miprun", "null"))
            maps = {_run_start(name): handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError, ValueError, RecursionError) as err:  # RecursionError: nested metadata
        raise DamagedMapsError(f"heal maps {path} cannot be read ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(stored, dict) or stored.get("format") != HEAL_FORMAT:
        raise HealError(f"{path} is not a miprun heal-map file; delete it and load again")
    if stored.get("fingerprint") != record["fingerprint"]:
        raise HealError(
            f"heal maps {path} belong to other weights (fingerprint {str(stored.get('fingerprint'))[:19]}..., "
            f"model has {record['fingerprint'][:19]}...); delete them or heal this model's own maps"
        )
    for field in ("version", "calibration", "recipe", "kept", "num_blocks"):
        if stored.get(field) != record[field]:
            raise HealError(
                f"heal maps {path} were made for {field}={stored.get(field)!r}, not {record[field]!r}; "
                "delete them or load with the settings they were made for"
            )
    problem = _maps_problem(maps, record, width)
    if problem:
        raise DamagedMapsError(f"heal maps {path} cannot be read ({problem})")
    return maps


def _run_start(name: str) -> int:
    """The run start of a stored tensor's name, ``map.<block>``."""
    prefix, _, start = name.partition(".")
    if prefix != "map" or not start.isascii() or not start.isdigit() or len(start) > 5:
        raise ValueError(f"it holds the tensor {name[:40]!r}, not map.<block>")
    return int(start)


# What a map may be stored as: float8 has no isfinite, and is not what the fit writes.
MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _maps_problem(maps: dict[int, torch.Tensor], record: dict[str, Any], width: int | None) -> str | None:
    """Why maps whose record matches cannot be folded (a failed write or disk), or None:
    one per run of the plan (the run at block 0 may stay unhealed), each a finite float
    ``[d]`` or ``[d, d]`` of one size ``d`` (the model's ``width`` when known)."""
    starts = [start for start, _ in heal_math.pruned_runs(pruned_of(record["kept"], record["num_blocks"]))]
    if set(maps) - set(starts) or {start for start in starts if start > 0} - set(maps):
        return f"it holds maps for runs starting at {sorted(maps)[:20]}, the plan's runs start at {starts[:20]}"
    for start, transform in maps.items():
        shape = list(transform.shape)
        if (transform.dtype not in MAP_DTYPES or len(shape) not in (1, 2) or not shape[0]
                or shape[1:] not in ([], shape[:1]) or shape[0] != next(iter(maps.values())).shape[0]):
            return (f"map.{start} is a {transform.dtype} tensor of shape {shape}, not a float [d] or [d, d] "
                    "like the others")
        if not torch.isfinite(transform).all():
            return f"map.{start} holds values that are not finite"
        if isinstance(width, int) and shape[0] != width:
            return f"map.{start} is {shape[0]} wide, the model's hidden size is {width}"
    return None


# --------------------------------------------------------------------------- fit


def pruned_of(kept: list[int], num_blocks: int) -> list[int]:
    return [b for b in range(num_blocks) if b not in set(kept)]


def heal_site(config: dict[str, Any]) -> HealSite:
    """Where the family catches a block's MLP contribution and folds its map; refuses, before
    any work, a recipe form that cannot fold there (a norm's gain takes a diagonal map only)."""
    from vllm_miprun.model import architectures

    family = architectures.for_config(config)
    if family.heal_site.folds_into_norm and RECIPE["form"] != "diag":
        raise HealError(f"heal=linear folds {family.family} maps into {family.heal_site.fold_into}'s gain, "
                        f"which takes only a diagonal map, and the recipe's form is {RECIPE['form']!r}; "
                        "use the diag form or heal=none")
    return family.heal_site


_HEAL_INT_QUANT = ("gptq", "awq")
_USE_NONE = "use heal=none, or heal an unquantized copy of the checkpoint"


def check_heal_quantization(config: dict[str, Any]) -> None:
    """Refuse, from the config alone (before any calibration or fit), a quantized checkpoint
    whose ``down_proj`` a map cannot fold into exactly. Only FP8 with one scale per output
    channel can take a diagonal map (into its scales); integer formats would need requantizing,
    and a per-tensor or block scale covers several channels."""
    from vllm_miprun.model.quantization import quant_method, quantization_config

    method = quant_method(config)
    if method is None:
        return
    if method in _HEAL_INT_QUANT:
        raise HealError(f"heal=linear cannot fold maps into {method}-quantized weights (integer values with "
                        f"group scales; folding would need requantizing them); {_USE_NONE}")
    strategies = _fp8_strategies(method, quantization_config(config))
    if strategies != {"channel"} or RECIPE["form"] != "diag":
        raise HealError(f"heal=linear folds into FP8 weights only through per-channel scales, and this "
                        f"{method} checkpoint's weight scales are {'/'.join(sorted(strategies))}; {_USE_NONE}")


def _fp8_strategies(method: str, qcfg: dict[str, Any]) -> set[str]:
    if method == "fp8":  # vLLM's own fp8 format: block scales, else one scale per tensor
        return {"block" if qcfg.get("weight_block_size") else "tensor"}
    return {str((group.get("weights") or {}).get("strategy")) for group in (qcfg.get("config_groups") or {}).values()}


def check_quantized_targets(header: dict[str, dict], blocks: Iterable[int]) -> None:
    """The tensor-level check before a fit: each ``down_proj`` that will take a map is float,
    or FP8 with a per-output-channel scale (which :func:`fold_stream` folds exactly)."""
    for block in blocks:
        module = f"model.layers.{block}.mlp.down_proj"
        if f"{module}.qweight" in header or f"{module}.weight_packed" in header:
            raise HealError(f"heal=linear cannot fold a map into {module}: its weights are integer-quantized "
                            f"(folding would need requantizing them); {_USE_NONE}")
        scale = next((header[f"{module}.{leaf}"] for leaf in _SCALE_LEAVES if f"{module}.{leaf}" in header), None)
        if scale is None:
            continue
        rows = header[f"{module}.weight"]["shape"][0]
        shape = list(scale["shape"])
        if shape not in ([rows], [rows, 1]) or RECIPE["form"] != "diag":
            raise HealError(f"heal=linear cannot fold a map exactly into {module}: its FP8 scale of shape {shape} "
                            f"is not one scale per output channel ([{rows}, 1]); {_USE_NONE}")


def check_foldable(kept: list[int], num_blocks: int, weight_names: Iterable[str], tied: bool,
                   site: HealSite) -> list[int]:
    """Run starts that will be healed; raise if the block before a run lacks the fold target."""
    names = set(weight_names)
    starts = []
    for start, _ in heal_math.pruned_runs(pruned_of(kept, num_blocks)):
        if start == 0:
            if tied:
                logger.warning("heal: the run starting at block 0 stays unhealed: its map would fold into "
                               "the embedding, which is tied to the LM head")
                continue
            starts.append(start)
            continue
        if not any(n.startswith(f"model.layers.{start - 1}.{site.fold_into}.") for n in names):
            raise HealError(
                f"heal=linear folds into model.layers.{start - 1}.{site.fold_into}, which this checkpoint lacks; "
                f"healing supports blocks with a dense {site.fold_into}; use heal=none"
            )
        starts.append(start)
    return starts


def fit_maps(model_dir: str | Path, ids: torch.Tensor, kept: list[int], starts: list[int],
             device: str = "cpu", progress: bool = True, recipe: dict[str, Any] | None = None) -> dict[int, torch.Tensor]:
    """The least-squares maps, then, for ``heal=distill``'s recipe, trained on the next-token
    KL (both in ``pipeline.heal_fit``)."""
    recipe = RECIPE if recipe is None else recipe
    from vllm_miprun.pipeline import heal_fit

    maps = heal_fit.least_squares_maps(model_dir, ids, kept, starts, device, progress, recipe)
    if recipe.get("objective") != "kl" or not maps:
        return maps
    return heal_fit.distill_maps(model_dir, ids, kept, maps, recipe, device=device, progress=progress)


def heal_ids(model_dir: str | Path, settings) -> torch.Tensor:
    """Calibration windows: ``settings.samples`` from each corpus of the recipe's mix when
    ``settings.dataset`` is one of them, else from ``settings.dataset`` alone."""
    from dataclasses import replace

    from vllm_miprun.pipeline.calibrate import calibration_ids

    names = RECIPE["mix"] if settings.dataset in RECIPE["mix"] else [settings.dataset]
    return torch.cat([calibration_ids(model_dir, replace(settings, dataset=name)) for name in names])


# --------------------------------------------------------------------------- load or fit, and fold


def maps_request(model_dir: str | Path, options, kept: list[int], num_blocks: int):
    """``(starts, record, path)`` of the maps this plan needs, after every check that
    refuses healing; None when nothing is healed (``heal=none`` or no run to heal)."""
    if getattr(options, "heal", "none") == "none":
        return None
    from vllm_miprun.model import checkpoint
    from vllm_miprun.pipeline.hub_alias import MissingWeightsError, weights_fingerprint

    config = checkpoint.read_config(model_dir)
    site = heal_site(config)
    check_heal_quantization(config)
    names = checkpoint.tensor_names(model_dir)  # from the index: a node may hold only the kept shards
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in names
    starts = check_foldable(list(kept), num_blocks, names, tied, site)
    if not starts:
        return None
    targets = [start - 1 for start in starts if start > 0]  # kept blocks: their shards are here
    if not site.folds_into_norm:  # a norm's gain is never quantized
        check_quantized_targets(_headers_holding(model_dir, targets), targets)
    try:
        fingerprint = weights_fingerprint(model_dir, options.cache_dir)
    except MissingWeightsError:
        raise HealError(
            f"heal maps are found by the weights' fingerprint, but {model_dir} lacks the shards "
            f"{checkpoint.missing_shards(model_dir)} and the cache folder has no hub alias for its commit; "
            "give this process the cache folder the planning process used (cache_dir), or fetch every shard"
        ) from None
    record = heal_record(fingerprint, options.calibration.to_json(), list(kept), num_blocks,
                         recipe_for(options.heal, config))
    return starts, record, heal_path(model_dir, record, options.cache_dir)


def _headers_holding(model_dir: str | Path, blocks: list[int]) -> dict[str, dict]:
    """Safetensors headers of the shards holding these blocks' ``down_proj`` (all shards
    without an index): never a shard a worker did not fetch."""
    from vllm_miprun.model import checkpoint

    index = Path(model_dir) / checkpoint.INDEX_NAME
    if not index.is_file():
        files = checkpoint.safetensors_files(model_dir)
    else:
        prefixes = tuple(f"model.layers.{block}.mlp.down_proj." for block in blocks)
        weight_map = checkpoint.read_weight_map(model_dir)
        files = sorted({Path(model_dir) / shard for name, shard in weight_map.items() if name.startswith(prefixes)})
    return {name: info for path in files for name, info in checkpoint.read_header(path).items()}


def needs_fit(model_dir: str | Path, options, kept: list[int], num_blocks: int) -> bool:
    """Whether :func:`prepare_maps` would fit (run the model) rather than read or do nothing."""
    request = maps_request(model_dir, options, kept, num_blocks)
    return request is not None and not request[2].exists()


def prepare_maps(model_dir: str | Path, options, kept: list[int], num_blocks: int,
                 progress: bool = True) -> dict[int, torch.Tensor]:
    """The maps for this model, settings and plan: read if stored, else fitted and stored.

    ``{}`` for ``heal=none``. With ``require_cache``, missing maps are an error, not a fit.
    Reads no shard a worker did not fetch (a hub snapshot with only the kept blocks'
    shards): tensor names come from the index, the fingerprint from the hub alias.
    """
    from vllm_miprun.model import checkpoint

    request = maps_request(model_dir, options, kept, num_blocks)
    if request is None:
        return {}
    starts, record, path = request
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=3600):  # tensor-parallel workers fit once, then read
        if path.exists():
            try:
                return read_maps(path, record, checkpoint.read_config(model_dir).get("hidden_size"))
            except DamagedMapsError as err:
                if options.require_cache:
                    raise HealError(f"{err}; require_cache is set, so they are not fitted again: delete "
                                    "the file and load once without require_cache") from None
                logger.warning("heal: %s; fitting them again", err)
        elif options.require_cache:
            raise HealError(f"no heal maps at {path} and require_cache is set; load once without "
                            "require_cache (or run `vllm-miprun export --heal linear`) to fit them")
        logger.info("heal: fitting %d map(s) for runs starting at %s", len(starts), starts)
        start = time.perf_counter()
        maps = fit_maps(model_dir, heal_ids(model_dir, options.calibration), list(kept), starts,
                        device=resolve_device(options.device), progress=progress, recipe=record["recipe"])
        write_maps(path, record, maps)
        logger.info("heal: fitted %d map(s) in %.1f s", len(maps), time.perf_counter() - start)
    return maps


def fold_stream(stream: Iterable[tuple[str, torch.Tensor]], maps: dict[int, torch.Tensor],
                kept: list[int], site: HealSite, complete: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Fold each run's map into the renumbered fold target (``site.fold_into``: ``down_proj``'s
    weight and bias, or a norm's gain) of the block before it, or into the embedding for a run
    at block 0. Other tensors pass unchanged. ``complete``: the stream is a whole checkpoint,
    so every target must come (a weight push may carry only some tensors)."""
    if not maps:
        yield from stream
        return
    maps = {start: heal_math.compact(t) for start, t in maps.items()}  # diagonal: [d] scales
    targets = {kept.index(start - 1): t for start, t in maps.items() if start > 0}
    module = f".{site.fold_into}."
    seen, quantized, scaled = set(), set(), set()
    for name, tensor in stream:
        index = layer_index(name)
        if index in targets and module in name and site.folds_into_norm and name.endswith(".weight"):
            tensor = heal_math.fold_norm_gain(tensor, _diagonal(name, targets[index]), site.gain_offset)
            seen.add(index)
        elif index in targets and module in name and name.endswith(_SCALE_LEAVES):
            tensor = _fold_scale(name, tensor, targets[index])
            scaled.add(index)
        elif index in targets and module in name and name.endswith((".weight", ".bias")):
            if tensor.dtype.is_floating_point and tensor.element_size() == 1:  # FP8: the scale takes |t|
                tensor = heal_math.flip_rows(tensor, _diagonal(name, targets[index]))
                quantized.add(index)
            else:
                fold = heal_math.fold_down_proj if name.endswith(".weight") else heal_math.fold_bias
                tensor = fold(tensor, targets[index])
            seen.add(index)
        elif name == EMBED and 0 in maps:
            tensor = heal_math.fold_embedding(tensor, maps[0])
            seen.add("embed")
        yield name, tensor
    missing = (set(targets) - seen) | ({"embed"} - seen if 0 in maps else set()) | (quantized - scaled)
    if missing and complete:
        raise HealError(f"heal maps target blocks {sorted(map(str, missing))} whose weights never came; "
                        "the checkpoint does not match the plan")


def _diagonal(name: str, transform: torch.Tensor) -> torch.Tensor:
    if not heal_math.is_diagonal(transform):
        raise HealError(f"only a diagonal heal map folds into {name} exactly (an FP8 weight or a norm's gain), "
                        "and this map is not diagonal; use heal=none")
    return transform


def _fold_scale(name: str, scale: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    if scale.numel() != transform.shape[0]:
        raise HealError(f"{name} holds {scale.numel()} scale(s), not one per output channel "
                        f"({transform.shape[0]}); a heal map cannot fold into it exactly; use heal=none")
    return heal_math.fold_channel_scale(scale, _diagonal(name, transform))


def fold_into_model(model, maps: dict[int, torch.Tensor], kept: list[int], site: HealSite) -> None:
    """Fold ``maps`` into a pruned Hugging Face model in place (the eval backend's path):
    its parameters go through :func:`fold_stream`, and those it changed are written back."""
    params = {name: param.detach() for name, param in model.named_parameters()}  # shares their storage
    with torch.no_grad():
        for name, tensor in fold_stream(params.items(), maps, kept, site=site):
            if tensor is not params[name]:
                params[name].copy_(tensor)
