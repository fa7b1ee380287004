"""The folders every vLLM process must agree on, carried in the config, not the environment.

The front process resolves them once and writes them into ``model_loader_extra_config``,
which vLLM ships to every worker whatever the executor. The environment is not shipped
alike: ``mp`` workers inherit the front's, but a Ray actor has its node's. vLLM's
``RayExecutorV2`` (the default ``ray`` backend) fills in the driver's variables only where
the node has none of its own, the older ``RayDistributedExecutor`` copies only
``VLLM_*``, ``HF_*`` and a few more (``vllm/ray/ray_env.py``), and a Ray actor's working
directory is not the front's. So no worker reads ``MIPRUN_CACHE_DIR``, ``MIPRUN_HOME`` or
``MIPRUN_RUN_DIR``; it reads:

* ``cache_dir``: the score cache folder (score caches, hub aliases, heal maps), made
  absolute, so every worker reads the heal maps the front process fitted;
* ``run_dir``: the folder where each worker leaves its load report for the API server's
  metrics (:mod:`vllm_miprun.vllm.reports`). A worker on a node without that folder keeps
  its report in-process.

Plain Python: no vLLM import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from vllm_miprun.options import RUN_DIR_KEY
from vllm_miprun.pipeline.store import cache_folder
from vllm_miprun.vllm import reports


def carry_paths(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``extra`` with the absolute cache folder and this run's report folder added."""
    carried = dict(extra or {})
    carried["cache_dir"] = os.path.abspath(cache_folder(carried.get("cache_dir")))
    folder = reports.run_dir(create=True)
    if folder is not None:
        carried[RUN_DIR_KEY] = os.path.abspath(folder)
    return carried


def carried_run_dir(extra: Mapping[str, Any] | None) -> Path | None:
    """The report folder the front process carried, when this node has it."""
    value = (extra or {}).get(RUN_DIR_KEY)
    return Path(value) if isinstance(value, str) and Path(value).is_dir() else None
