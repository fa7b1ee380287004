"""Hooks into vLLM's ``EngineArgs``: the ``--miprun-*`` flags and the front-process plan.

``register()`` wraps three ``EngineArgs`` methods, once:

* ``add_cli_args`` adds the ``--miprun-*`` flags. Each value is checked by argparse,
  so ``--miprun-keep 1.5`` ends in a one-line usage error before anything starts.
* ``from_cli_args`` moves the flags into ``model_loader_extra_config`` (a key given both
  ways with different values is an error) and switches ``--load-format`` to ``miprun``:
  any ``--miprun-*`` flag implies it. It then plans (below); an ``OptionError`` becomes
  a one-line exit without traceback, since no engine process exists yet.
* ``create_engine_config`` plans when the load format is ``miprun`` and nobody has yet
  (the Python ``LLM(...)`` path), raising ``OptionError`` to the caller.

Planning validates the options, makes the plan and writes the pruned config fields
into ``hf_overrides``, so every process (engine core, each TP worker) builds the same
K-block model, and vLLM's config hash covers the kept indices.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from vllm.logger import init_logger

from vllm_miprun.model import remap
from vllm_miprun.options import METHODS, MiprunOptions, OptionError, parse_keep

# Under "vllm." so vLLM's logging config (handler, level, format) applies to it.
logger = init_logger(f"vllm.{__name__}")

LOAD_FORMAT = "miprun"
_WRAPPED = "_miprun_wrapped"

# (option key, flag, argparse keyword arguments)
FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("keep", "--miprun-keep", {"help": "keep ratio in (0, 1], e.g. 0.75"}),
    ("latency_budget", "--miprun-latency-budget",
     {"help": "fraction of full per-token latency (0.8) or ms per token (12ms)"}),
    ("method", "--miprun-method", {"choices": METHODS, "help": "block selection method"}),
    ("scores", "--miprun-scores", {"help": "explicit score cache file"}),
    ("protect", "--miprun-protect", {"help": "blocks never dropped: first, last, or 0,29"}),
    ("require_cache", "--miprun-require-cache",
     {"action": "store_true", "help": "refuse to calibrate at load time"}),
)


def _keep_type(text: str) -> float:
    try:
        return parse_keep(text)
    except OptionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_miprun_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--miprun-*`` flags to ``parser`` unless they are already there."""
    if "--miprun-keep" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group(
        "miprun", "Load-time block pruning (vllm-miprun). Any --miprun-* flag implies "
        "--load-format miprun; the same keys work in --model-loader-extra-config."
    )
    for key, flag, kwargs in FLAGS:
        extra = {"type": _keep_type} if key == "keep" else {}
        group.add_argument(flag, dest=f"miprun_{key}", default=None, **extra, **kwargs)
    return parser


def flags_to_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--miprun-*`` values the user actually gave, keyed by option name."""
    given = {key: getattr(args, f"miprun_{key}", None) for key, _, _ in FLAGS}
    return {key: value for key, value in given.items() if value is not None}


def merge_extra_config(explicit: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """``--model-loader-extra-config`` plus the flags; a key given twice must agree."""
    merged = dict(explicit or {})
    for key, value in flags.items():
        if key in merged and str(merged[key]) != str(value):
            raise OptionError(
                f"{key} is given twice with different values: --model-loader-extra-config "
                f"has {merged[key]!r}, --miprun-{key.replace('_', '-')} has {value!r}; "
                "give it once"
            )
        merged[key] = value
    return merged


def apply_flags(engine_args, args: argparse.Namespace) -> None:
    """Move the ``--miprun-*`` flags into the engine args (they imply miprun)."""
    flags = flags_to_options(args)
    if not flags:
        return
    if engine_args.load_format not in ("auto", LOAD_FORMAT):
        raise OptionError(
            f"--miprun-* flags need --load-format {LOAD_FORMAT} (or no --load-format), "
            f"got --load-format {engine_args.load_format}"
        )
    engine_args.load_format = LOAD_FORMAT
    engine_args.model_loader_extra_config = merge_extra_config(
        engine_args.model_loader_extra_config, flags
    )


def prepare_engine_args(engine_args) -> None:
    """Validate, plan, and write the pruned config into ``hf_overrides`` (once)."""
    if str(engine_args.load_format).lower() != LOAD_FORMAT:
        return
    overrides = engine_args.hf_overrides
    if callable(overrides):
        raise OptionError("--load-format miprun cannot be combined with a callable hf_overrides")
    overrides = dict(overrides or {})
    if remap.KEPT_FIELD in overrides:
        return  # already planned: create_engine_config after from_cli_args
    from vllm_miprun.model.checkpoint import read_config
    from vllm_miprun.vllm.loader import plan_report, record_report
    from vllm_miprun.vllm.model_files import resolve_model_dir

    options = MiprunOptions.from_dict(engine_args.model_loader_extra_config)
    model_dir = resolve_model_dir(engine_args.model, engine_args.revision)
    hf_config = read_config(model_dir)
    hf_config.update({k: v for k, v in overrides.items() if not isinstance(v, dict)})
    start = time.perf_counter()
    plan = plan_outside_cuda(model_dir, options, hf_config)
    pruned_fields = remap.config_overrides(hf_config, plan.kept)
    engine_args.hf_overrides = {**overrides, **pruned_fields}
    report = plan_report(plan, time.perf_counter() - start)
    logger.info(
        "miprun plan: keep %d of %d blocks, kept %s, pruned %s, method %s, scores %s, "
        "predicted speedup %.2fx", len(plan.kept), plan.num_blocks, list(plan.kept),
        list(plan.pruned), plan.method, plan.scores_source, plan.predicted_speedup,
    )
    record_report(report)


def plan_outside_cuda(model_dir, options: MiprunOptions, hf_config: dict):
    """The plan; made in a spawned child when it may initialise CUDA, so that this (API
    server) process leaves the GPU as it found it for vLLM's memory profiling."""
    from vllm_miprun.pipeline.child import needs_child, plan_in_child
    from vllm_miprun.vllm.loader import make_plan_for

    if not needs_child(options):
        return make_plan_for(model_dir, options, hf_config)
    remap.check_architecture(hf_config)  # cheap, and its error needs no child
    return plan_in_child(model_dir, options, hf_config)


def _wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        return add_miprun_args(original(parser, *args, **kwargs))

    return add_cli_args


def _wrap_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        try:
            apply_flags(engine_args, args)
            prepare_engine_args(engine_args)
        except ValueError as error:  # OptionError, CacheError, CorpusError, ModelFolderError:
            # CLI: one line, no traceback, nothing started yet
            raise SystemExit(f"vllm-miprun: error: {error}") from None
        return engine_args

    return from_cli_args


def _wrap_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        prepare_engine_args(self)
        return original(self, *args, **kwargs)

    return create_engine_config


def install() -> None:
    """Wrap the ``EngineArgs`` methods once; later calls do nothing."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _WRAPPED, False):
        return
    EngineArgs.add_cli_args = staticmethod(_wrap_add_cli_args(EngineArgs.add_cli_args))
    EngineArgs.from_cli_args = classmethod(_wrap_from_cli_args(EngineArgs.from_cli_args.__func__))
    EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    setattr(EngineArgs, _WRAPPED, True)
