"""Plan in a child process, so that the calling process never touches CUDA.

``vllm serve`` and ``LLM(...)`` plan in the front process before vLLM starts the engine.
If that process initialised CUDA (a calibration or forward search with ``device="cuda"``),
the memory it keeps would hide part of the GPU from vLLM's memory profiling. The child
does the work and exits, which returns every byte it used to the GPU.

The child is a fresh interpreter started on this module (``python -m
vllm_miprun.pipeline.child IN OUT``), not a ``multiprocessing`` spawn: spawn re-imports the
caller's ``__main__``, so a script that calls ``LLM(...)`` at top level, without an
``if __name__ == "__main__":`` guard (most vLLM examples), would start itself again.
Inputs and results travel as JSON files, never pickle.

``MIPRUN_PLAN_CHILD`` overrides the choice: ``always`` plans in a child even on CPU,
``never`` plans in the calling process even on CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vllm_miprun import envs
from vllm_miprun.errors import EXIT_INTERRUPTED, MiprunError
from vllm_miprun.options import MiprunOptions, resolve_device
from vllm_miprun.pipeline.plan import SCORE_FREE_METHODS, Plan

logger = logging.getLogger(__name__)


class ChildPlanError(MiprunError):
    """The planning child process failed with an error that is not a MiprunError."""


def on_cuda(options: MiprunOptions) -> bool:
    """Whether work on ``options.device`` runs on CUDA (``auto`` resolved: this asks torch
    whether a GPU exists, which creates no CUDA context)."""
    return resolve_device(options.device).startswith("cuda")


def needs_child(options: MiprunOptions, model_dir: str | Path | None = None) -> bool:
    """Whether planning may initialise CUDA: a CUDA device and a plan that reads the model
    (scores, a forward search or the quality budget's validation passes; not a ``drop``
    list nor a score-free method without a quality budget). With ``model_dir``, a plan that
    its score cache answers without a forward pass needs none."""
    mode = envs.plan_child()
    if mode != "auto":
        return mode == "always"
    reads_model = options.method not in SCORE_FREE_METHODS or options.quality_budget is not None
    if not on_cuda(options) or options.drop is not None or not reads_model:
        return False
    if model_dir is not None and options.quality_budget is None:  # the walk's passes are not in that answer
        from vllm_miprun.pipeline.plan import answered_by_cache

        return not answered_by_cache(model_dir, options)
    return True


def heal_needs_child(options: MiprunOptions, model_dir: str | Path | None = None,
                     kept: list[int] | None = None, num_blocks: int | None = None) -> bool:
    """Whether a heal fit should run in a child (it runs on ``options.device``). With the
    plan, maps already stored (read, not fitted) or nothing to heal need none; the checks
    that refuse healing then run here, before any child."""
    mode = envs.plan_child()
    if mode != "auto" or options.heal == "none" or not on_cuda(options):
        return mode == "always" and options.heal != "none"
    if model_dir is not None and kept is not None and num_blocks is not None:
        from vllm_miprun.pipeline.heal import needs_fit

        return needs_fit(model_dir, options, kept, num_blocks)
    return True


def rank_device(resolved: str, local_rank: str | None, device_count: int) -> str:
    """The device a child should use: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a
    launcher that sets ``LOCAL_RANK`` (torchrun), so each rank's child works on its own GPU
    rather than all of them on ``cuda:0``. With one visible GPU per rank (fewer GPUs than the
    rank's index) the rank's GPU is ``cuda``'s default, and ``cuda`` stays."""
    if resolved != "cuda" or not (local_rank or "").isdigit() or int(local_rank) >= device_count:
        return resolved
    return f"cuda:{int(local_rank)}"


def _child_options(options: MiprunOptions) -> MiprunOptions:
    resolved = resolve_device(options.device)
    if resolved != "cuda":
        return dataclasses.replace(options, device=resolved)
    import torch

    device = rank_device(resolved, os.environ.get("LOCAL_RANK"), torch.cuda.device_count())
    return dataclasses.replace(options, device=device)


def plan_in_child(model_dir: str | Path, options: MiprunOptions, hf_config: dict | None = None) -> Plan:
    """:func:`vllm_miprun.pipeline.plan.make_plan` in a child process."""
    options = _child_options(options)
    logger.info("planning in a child process (device %s), so this process never initialises CUDA",
                options.device)
    result = run_task({"task": "plan", "model_dir": str(model_dir), "options": options_to_raw(options),
                       "hf_config": hf_config})
    return Plan.from_json(result)


def heal_in_child(model_dir: str | Path, options: MiprunOptions, kept: list[int], num_blocks: int) -> None:
    """:func:`vllm_miprun.pipeline.heal.prepare_maps` in a child process (it stores the maps)."""
    options = _child_options(options)
    logger.info("fitting heal maps in a child process (device %s), so this process never initialises CUDA",
                options.device)
    run_task({"task": "heal", "model_dir": str(model_dir), "options": options_to_raw(options),
              "kept": list(kept), "num_blocks": num_blocks})


def options_to_raw(options: MiprunOptions) -> dict[str, Any]:
    """``options`` as the flat ``model_loader_extra_config`` dict ``MiprunOptions.from_dict`` reads."""
    data = options.to_json()
    calibration = data.pop("calibration")
    return {key: value for key, value in {**data, **calibration}.items() if value is not None}


def run_task(request: dict[str, Any]) -> Any:
    """Run ``request`` in ``python -m vllm_miprun.pipeline.child``; its MiprunErrors are raised
    here as the same class, anything else as ``ChildPlanError``."""
    with tempfile.TemporaryDirectory(prefix="miprun-child-") as folder:
        request_path, answer_path = Path(folder) / "request.json", Path(folder) / "answer.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        completed = subprocess.run([sys.executable, "-m", __name__, str(request_path), str(answer_path)],
                                   stdin=subprocess.DEVNULL, check=False)
        if not answer_path.is_file():
            raise ChildPlanError(f"the planning child process exited with status {completed.returncode} "
                                 "and no answer; its log is above")
        answer = json.loads(answer_path.read_text(encoding="utf-8"))
    if "error" in answer:
        raise _error_from(answer["error"])
    return answer["result"]


def _error_from(error: dict[str, str]) -> MiprunError:
    """The child's MiprunError as the same class here (only classes of this package)."""
    module, _, name = str(error.get("class", "")).rpartition(".")
    message = str(error.get("message", ""))
    if module.split(".")[0] == "vllm_miprun":
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, MiprunError):
            try:
                return cls(message)
            except TypeError:  # a class with another constructor: the message still says it all
                pass
    return ChildPlanError(f"planning in a child process failed: {error.get('class')}: {message}")


# --------------------------------------------------------------------------- the child's side


def _require_cuda(options: MiprunOptions) -> None:
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ChildPlanError(
                f"device {options.device} was asked for, but the planning child process (pid {os.getpid()}) "
                "sees no CUDA device; set device cpu or check CUDA_VISIBLE_DEVICES"
            )


def serve_request(request: dict[str, Any]) -> Any:
    """Do one request (the child's work): ``plan`` returns the plan as JSON, ``heal`` stores the maps."""
    options = MiprunOptions.from_dict(request["options"])
    _require_cuda(options)
    if request["task"] == "plan":
        from vllm_miprun.pipeline.plan import make_plan

        return make_plan(request["model_dir"], options, hf_config=request.get("hf_config"),
                         progress=False).to_json()
    if request["task"] == "heal":
        from vllm_miprun.pipeline.heal import prepare_maps

        prepare_maps(request["model_dir"], options, request["kept"], request["num_blocks"], progress=False)
        return None
    raise ChildPlanError(f"unknown child task {request['task']!r}; expected plan or heal")


def main(argv: list[str]) -> int:
    from vllm_miprun.pipeline.store import atomic_write_text

    logging.basicConfig(level=logging.INFO, format="miprun child %(process)d %(levelname)s %(name)s: %(message)s")
    request_path, answer_path = Path(argv[0]), Path(argv[1])
    try:
        answer = {"result": serve_request(json.loads(request_path.read_text(encoding="utf-8")))}
    except KeyboardInterrupt:  # Ctrl-C reaches the parent too (one group); it says so in one line
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure goes back to the parent as one line
        cls = type(error)
        answer = {"error": {"class": f"{cls.__module__}.{cls.__qualname__}", "message": str(error)}}
    atomic_write_text(answer_path, json.dumps(answer))
    return 0


if __name__ == "__main__":
    # Through the package's own module, so the classes of the errors sent back are its classes.
    from vllm_miprun.pipeline.child import main as package_main

    sys.exit(package_main(sys.argv[1:]))
