"""Plan in a spawned child process, so that the calling process never touches CUDA.

``vllm serve`` plans in its API-server process before vLLM starts the engine. If that
process initialised CUDA (a calibration or forward search with ``device="cuda"``), the
memory it keeps would hide part of the GPU from vLLM's memory profiling. The child
(``spawn``: a fresh interpreter, no inherited CUDA state) does the work and exits, which
returns every byte it used to the GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from vllm_miprun.errors import MiprunError
from vllm_miprun.options import MiprunOptions, resolve_device
from vllm_miprun.pipeline.plan import SCORE_FREE_METHODS

logger = logging.getLogger(__name__)


class ChildPlanError(MiprunError):
    """The planning child process failed with an error that is not a MiprunError."""


def on_cuda(options: MiprunOptions) -> bool:
    """Whether work on ``options.device`` runs on CUDA (``auto`` resolved: this asks torch
    whether a GPU exists, which creates no CUDA context)."""
    return resolve_device(options.device).startswith("cuda")


def needs_child(options: MiprunOptions) -> bool:
    """Whether planning may initialise CUDA: a CUDA device and a plan that reads the model
    (scores, a forward search or the quality budget's validation passes; not a ``drop``
    list nor a score-free method without a quality budget)."""
    reads_model = options.method not in SCORE_FREE_METHODS or options.quality_budget is not None
    return on_cuda(options) and options.drop is None and reads_model


def run_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a spawned child process; its MiprunErrors are raised here as they are."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except MiprunError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with the child's message
            raise ChildPlanError(
                f"planning in a child process failed: {type(error).__name__}: {error}"
            ) from None


def plan_in_child(model_dir: str | Path, options: MiprunOptions, hf_config: dict | None = None):
    """:func:`vllm_miprun.pipeline.plan.make_plan` in a spawned child process."""
    logger.info("planning in a child process (device %s), so this process never initialises CUDA",
                options.device)
    return run_in_child(_make_plan, str(model_dir), options, hf_config)


def heal_in_child(model_dir: str | Path, options: MiprunOptions, kept: list[int], num_blocks: int) -> None:
    """:func:`vllm_miprun.pipeline.heal.prepare_maps` in a spawned child process (it stores the maps)."""
    logger.info("fitting heal maps in a child process (device %s), so this process never initialises CUDA",
                options.device)
    run_in_child(_prepare_maps, str(model_dir), options, list(kept), num_blocks)


def _require_cuda(options: MiprunOptions) -> None:
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ChildPlanError(
                f"device {options.device} was asked for, but the planning child process (pid {os.getpid()}) "
                "sees no CUDA device; set device cpu or check CUDA_VISIBLE_DEVICES"
            )


def _prepare_maps(model_dir: str, options: MiprunOptions, kept: list[int], num_blocks: int) -> None:
    _require_cuda(options)
    from vllm_miprun.pipeline.heal import prepare_maps

    prepare_maps(model_dir, options, kept, num_blocks, progress=False)


def _make_plan(model_dir: str, options: MiprunOptions, hf_config: dict | None):
    _require_cuda(options)
    from vllm_miprun.pipeline.plan import make_plan

    return make_plan(model_dir, options, hf_config=hf_config, progress=False)
