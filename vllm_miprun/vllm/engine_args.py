"""Hooks into vLLM's ``EngineArgs``: the ``--miprun-*`` flags and the front-process plan.

``register()`` wraps three ``EngineArgs`` methods, once:

* ``add_cli_args`` adds a ``--miprun-*`` flag for every row of the option table
  (``vllm_miprun.options``). Each value is checked by the option's own parser in argparse,
  so ``--miprun-keep 1.5`` ends in a one-line usage error (exit 2) before anything starts.
* ``from_cli_args`` moves the flags into ``model_loader_extra_config`` (a key given both
  ways with different values is an error) and switches ``--load-format`` to ``miprun``:
  any ``--miprun-*`` flag implies it. It then plans (below); a ``MiprunError`` becomes
  a one-line exit with status 1 and no traceback, since no engine process exists yet.
  With vLLM's Rust frontend (``VLLM_USE_RUST_FRONTEND=1``) it warns that no ``miprun_*``
  gauge will reach ``/metrics``.
* ``create_engine_config`` plans when the load format is ``miprun`` and nobody has yet
  (the Python ``LLM(...)`` path), raising the ``MiprunError`` to the caller, its hint
  written as the ``model_loader_extra_config`` entry to give.

Planning validates the options, makes the plan and writes the pruned config fields
into ``hf_overrides``, so every process (engine core, each TP worker) builds the same
K-block model, and vLLM's config hash covers the kept indices.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

from vllm.logger import init_logger

from vllm_miprun import route_library_logs_to_vllm
from vllm_miprun.errors import EXIT_INTERRUPTED, USER_ERRORS, MiprunError, interruptible_in_event_loop
from vllm_miprun.model import remap
from vllm_miprun.option_flags import add_serve_flags, entry_wording, serve_flag_values
from vllm_miprun.options import MiprunOptions, OptionError, option
from vllm_miprun.vllm import lora_and_draft
from vllm_miprun.vllm.compat import check_vllm_supported, reloads_experts_by_served_names
from vllm_miprun.vllm.cpu_dtype import apply_cpu_dtype_default

# Under "vllm." so vLLM's logging config (handler, level, format) applies to it.
logger = init_logger(f"vllm.{__name__}")

LOAD_FORMAT = "miprun"
_WRAPPED = "_miprun_wrapped"


def merge_extra_config(explicit: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """``--model-loader-extra-config`` plus the flags; a key given twice must agree
    (compared after parsing, so ``"3-6"`` and ``[3, 4, 5, 6]`` agree)."""
    merged = dict(explicit or {})
    for key, value in flags.items():
        if key in merged and option(key).parse(merged[key]) != option(key).parse(value):
            raise OptionError(
                f"{key} is given twice with different values: --model-loader-extra-config "
                f"has {merged[key]!r}, {option(key).serve_flag} has {value!r}; give it once"
            )
        merged[key] = value
    return merged


def load_format(engine_args) -> str:
    """``--load-format`` as vLLM reads it (``LoadConfig`` lower-cases it)."""
    return str(engine_args.load_format).lower()


def apply_flags(engine_args, args: argparse.Namespace) -> None:
    """Move the ``--miprun-*`` flags into the engine args (they imply miprun)."""
    flags = serve_flag_values(args)
    if not flags:
        return
    if load_format(engine_args) not in ("auto", LOAD_FORMAT):
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
    if load_format(engine_args) != LOAD_FORMAT:
        return
    check_vllm_supported()  # an unchecked vLLM release: one line, unless the user opted in
    check_load_strategy(engine_args)
    check_fault_tolerance(engine_args)
    apply_cpu_dtype_default(engine_args)  # float32, not emulated bfloat16, on such CPUs (once)
    overrides = engine_args.hf_overrides
    if callable(overrides):
        raise OptionError("--load-format miprun cannot be combined with a callable hf_overrides")
    overrides = dict(overrides or {})
    if remap.KEPT_FIELD in overrides:
        return  # already planned: create_engine_config after from_cli_args
    from vllm_miprun.pipeline.plan import digest_fields
    from vllm_miprun.vllm.loader import plan_report, record_report
    from vllm_miprun.vllm import model_files, worker_paths

    MiprunOptions.from_dict(engine_args.model_loader_extra_config)  # a bad option fails first
    route_library_logs_to_vllm()  # the planner's progress lines (calibration, search) reach the server log
    # the folders workers use, resolved here: Ray actors do not inherit this environment
    engine_args.model_loader_extra_config = worker_paths.carry_paths(engine_args.model_loader_extra_config)
    options = MiprunOptions.from_dict(engine_args.model_loader_extra_config)
    source = model_files.ModelSource.from_engine_args(engine_args)
    with interruptible_in_event_loop():  # Ctrl-C while `vllm serve` calibrates stops the start
        planned = model_files.plan_source(
            source, options, lambda folder, hf_config: plan_outside_cuda(folder, options, hf_config), overrides)
        plan = planned.plan
        pruned_fields = remap.pruned_fields(planned.folder, planned.hf_config, plan.kept)
        start = time.perf_counter()
        heal_outside_cuda(planned.folder, options, list(plan.kept), plan.num_blocks)  # fit once here, workers read
    engine_args.hf_overrides = {**overrides, **pruned_fields, **digest_fields(plan)}
    report = plan_report(plan, planned.plan_seconds + time.perf_counter() - start)
    logger.info(
        "miprun plan: keep %d of %d blocks, kept %s, pruned %s, method %s, scores %s, "
        "predicted speedup %.2fx, plan digest %s", len(plan.kept), plan.num_blocks, list(plan.kept),
        list(plan.pruned), plan.method, plan.scores_source, plan.predicted_speedup, plan.digest,
    )
    record_report(report)


def check_load_strategy(engine_args) -> None:
    """Refuse a ``--safetensors-load-strategy`` other than lazy: the miprun loader reads
    only the kept tensors through memory maps, so eager reads, whole-file prefetch and
    torchao tensor subclasses would be silently ignored."""
    strategy = getattr(engine_args, "safetensors_load_strategy", None)
    if strategy not in (None, "lazy"):
        raise OptionError(
            f"--safetensors-load-strategy {strategy} does not apply to --load-format {LOAD_FORMAT}, "
            "which reads only the kept blocks' tensors, lazily; drop the flag, or export the pruned "
            "checkpoint (vllm-miprun export) and serve it with the default loader"
        )


def check_fault_tolerance(engine_args) -> None:
    """Refuse fault tolerance with EPLB where vLLM re-reads a failed rank's experts from the
    checkpoint after a scale-down (0.34): it picks the tensors by the served model's layer
    numbers, while the checkpoint of a pruned model keeps the full model's, so it would find
    none or another block's."""
    if not (getattr(engine_args, "enable_fault_tolerance", False) and getattr(engine_args, "enable_eplb", False)):
        return
    if reloads_experts_by_served_names():
        raise OptionError(
            f"--enable-fault-tolerance with --enable-eplb re-reads experts from the checkpoint by the served "
            f"layer numbers, which --load-format {LOAD_FORMAT} renumbers; drop one of the two flags, or export "
            "the pruned checkpoint (vllm-miprun export) and serve it with the default loader"
        )


RUST_FRONTEND_ENV = "VLLM_USE_RUST_FRONTEND"


def rust_frontend_enabled(environ=os.environ) -> bool:
    """Whether ``vllm serve`` hands HTTP to vLLM's Rust frontend (``vllm-rs``): opt-in with
    ``VLLM_USE_RUST_FRONTEND=1``, read as vLLM reads it (``bool(int(...))``); ``vllm-rs serve``
    sets it for the Python engine it starts."""
    try:
        return bool(int(environ.get(RUST_FRONTEND_ENV, "0")))
    except ValueError:
        return False  # vLLM itself refuses such a value


def warn_rust_frontend_metrics(engine_args, environ=os.environ) -> bool:
    """Say once, in the front process, that the Rust frontend exports no miprun gauge.

    The plan still runs here and the engines still build the pruned model; but the Rust
    frontend serves ``/metrics`` itself and runs no Python ``AsyncLLM``, the only place vLLM
    loads ``vllm.stat_logger_plugins``, so the ``miprun_*`` gauges never appear."""
    if load_format(engine_args) != LOAD_FORMAT or not rust_frontend_enabled(environ):
        return False
    logger.warning(
        "miprun: %s=1: vLLM's Rust frontend serves /metrics itself and loads no stat-logger plugin, "
        "so the miprun_* gauges are not exported; the pruned model is served as planned (see the plan "
        "and load log lines). Unset %s to get the gauges", RUST_FRONTEND_ENV, RUST_FRONTEND_ENV,
    )
    return True


# The EngineArgs fields the plan decides, written back into the parsed arguments.
PLANNED_FIELDS = ("load_format", "model_loader_extra_config", "hf_overrides", "dtype")


def write_plan_back(engine_args, args: argparse.Namespace) -> None:
    """Put the planned fields into ``args``, the namespace vLLM pickles to every extra
    API server (``--api-server-count``, ``--data-parallel-size``).

    Those processes run vLLM's own ``from_cli_args`` before any plugin is loaded, so they
    never see the ``--miprun-*`` flags; from these fields they build the same pruned
    config without planning again (``hf_overrides`` already holds the kept blocks).
    """
    if load_format(engine_args) != LOAD_FORMAT:
        return
    for name in PLANNED_FIELDS:
        setattr(args, name, getattr(engine_args, name))


def plan_outside_cuda(model_dir, options: MiprunOptions, hf_config: dict):
    """The plan; made in a child process when it may initialise CUDA, so that this (API
    server) process leaves the GPU as it found it for vLLM's memory profiling."""
    from vllm_miprun.pipeline.child import needs_child, plan_in_child
    from vllm_miprun.vllm.loader import make_plan_for

    if not needs_child(options, model_dir):
        return make_plan_for(model_dir, options, hf_config)
    remap.check_architecture(hf_config)  # cheap, and its error needs no child
    return plan_in_child(model_dir, options, hf_config)


def heal_outside_cuda(model_dir, options: MiprunOptions, kept: list[int], num_blocks: int) -> None:
    """Fit and store the heal maps (``heal=linear``) once, in a child process when the fit
    would run on CUDA, for the same reason as :func:`plan_outside_cuda`."""
    from vllm_miprun.pipeline.child import heal_in_child, heal_needs_child
    from vllm_miprun.pipeline.heal import prepare_maps

    if not heal_needs_child(options, model_dir, kept, num_blocks):
        prepare_maps(model_dir, options, kept, num_blocks)
    else:
        heal_in_child(model_dir, options, kept, num_blocks)


def _wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = add_serve_flags(original(parser, *args, **kwargs))
        _settle_flags_when_parsed(parser)
        _plan_before_dp_supervisor()
        return parser

    return add_cli_args


def plan_in_supervisor(args: argparse.Namespace) -> None:
    """Plan once in the multi-port data-parallel supervisor and write the plan into ``args``,
    which vLLM copies to the server of every rank; those servers then build the pruned
    config from it without planning (``prepare_engine_args`` sees the kept blocks)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    AsyncEngineArgs.from_cli_args(args)  # the plugin's from_cli_args: plans, writes back


def _plan_before_dp_supervisor() -> None:
    """Wrap ``vllm serve``'s ``run_dp_supervisor`` (once) so that it plans first. The
    supervisor itself never builds engine arguments, so without this each rank's server
    would plan on its own. Only when ``vllm serve``'s module is already loaded: that is the
    CLI building its parser, the one place the supervisor can start from."""
    serve = sys.modules.get("vllm.entrypoints.cli.serve")
    original = getattr(serve, "run_dp_supervisor", None)
    if original is None or getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def run_dp_supervisor(args: argparse.Namespace) -> None:
        plan_in_supervisor(args)
        return original(args)

    setattr(run_dp_supervisor, _WRAPPED, True)
    serve.run_dp_supervisor = run_dp_supervisor


def _settle_flags_when_parsed(parser: argparse.ArgumentParser) -> None:
    """Move the ``--miprun-*`` flags into ``load_format`` and ``model_loader_extra_config``
    of the parsed namespace itself, so that a process which gets the namespace and never
    runs the plugin's ``from_cli_args`` (the servers the multi-port data-parallel
    supervisor starts; it plans nowhere itself) still serves the pruned model."""
    original = parser.parse_known_args
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def parse_known_args(*args, **kwargs):
        namespace, rest = original(*args, **kwargs)
        try:
            apply_flags(namespace, namespace)
        except OptionError:
            pass  # from_cli_args reports it in one line, like every option error
        return namespace, rest

    setattr(parse_known_args, _WRAPPED, True)
    parser.parse_known_args = parse_known_args


def one_line_exit(error: Exception) -> SystemExit:
    """A user error in vLLM's front process: one line, exit status 1, no traceback."""
    return SystemExit(f"vllm-miprun: error: {error}")


def interrupted_exit() -> SystemExit:
    """Ctrl-C or SIGTERM while the front process plans: one line, exit status 130. Planning
    made no call that exits, so a status-0 ``SystemExit`` there is a signal handler's."""
    logger.warning("miprun: interrupted while planning; no engine was started and no partial file written")
    return SystemExit(EXIT_INTERRUPTED)


_FROM_CLI = "_miprun_from_cli"  # set on EngineArgs made from a command line: errors exit in one line


def _wrap_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        setattr(engine_args, _FROM_CLI, True)
        try:
            apply_flags(engine_args, args)
            prepare_engine_args(engine_args)
            write_plan_back(engine_args, args)
            warn_rust_frontend_metrics(engine_args)
        except USER_ERRORS as error:  # MiprunError and missing files: one line, no traceback,
            # exit status 1 (vLLM's front process), nothing started yet
            raise one_line_exit(error) from None
        except KeyboardInterrupt:  # Ctrl-C while planning: every write is atomic, nothing started
            raise interrupted_exit() from None
        except SystemExit as stop:  # the multi-server launcher's own handler stops with status 0
            raise (interrupted_exit() if stop.code in (None, 0) else stop) from None
        return engine_args

    return from_cli_args


def _wrap_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        try:
            prepare_engine_args(self)
        except MiprunError as error:  # a Python caller (LLM(...)): its hint names the dict entry
            error.args = (entry_wording(str(error)),)
            raise
        config = original(self, *args, **kwargs)
        try:
            lora_and_draft.check_draft_depths(config)  # vLLM has just read the draft's config
        except MiprunError as error:
            if getattr(self, _FROM_CLI, False):
                raise one_line_exit(error) from None
            raise
        return config

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
