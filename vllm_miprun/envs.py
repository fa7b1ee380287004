"""Every environment variable the project reads, with its parser and default.

The README's option table lists the same names; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from vllm_miprun.errors import OptionError

PLAN_CHILD_MODES = ("auto", "always", "never")

ENV_VARS: dict[str, str] = {
    "MIPRUN_HOME": "root of converted models and score caches (default ~/.cache/vllm-miprun)",
    "MIPRUN_CACHE_DIR": "where score caches are written (default $MIPRUN_HOME/scores)",
    "MIPRUN_PLAN_CHILD": "where planning and heal fits run: auto (a child process when they may use CUDA), "
                         "always (a child process), never (the calling process)",
    "MIPRUN_RUN_DIR": "internal: the report folder the front process hands to vLLM's processes for metrics; do not set",
    "VLLM_MIPRUN_ALLOW_UNTESTED_VLLM": "1 lets --load-format miprun run on a vLLM release the plugin was not "
                                       "checked against (default: refused; a VLLM_* name so Ray forwards it)",
    "MIPRUN_TEST_WRITE_PAUSE": "tests only: a file path; every cache-folder write names its fsynced temp file there "
                               "and waits 10 min before its rename, so a test can kill it inside the write window",
}

ALLOW_UNTESTED_VLLM = "VLLM_MIPRUN_ALLOW_UNTESTED_VLLM"
_TRUE = ("1", "true", "yes", "on")


def home() -> Path:
    value = os.environ.get("MIPRUN_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vllm-miprun"


def cache_dir() -> Path:
    value = os.environ.get("MIPRUN_CACHE_DIR")
    return Path(value).expanduser() if value else home() / "scores"


def allow_untested_vllm() -> bool:
    return os.environ.get(ALLOW_UNTESTED_VLLM, "").strip().lower() in _TRUE


def plan_child(env: Mapping[str, str] | None = None) -> str:
    """``MIPRUN_PLAN_CHILD``: ``auto`` (default), ``always`` or ``never``."""
    value = (os.environ if env is None else env).get("MIPRUN_PLAN_CHILD", "").strip().lower() or "auto"
    if value not in PLAN_CHILD_MODES:
        raise OptionError(f"MIPRUN_PLAN_CHILD must be one of {', '.join(PLAN_CHILD_MODES)}, got {value!r}; "
                          "unset it or set auto")
    return value


def write_pause_hook() -> Path | None:
    value = os.environ.get("MIPRUN_TEST_WRITE_PAUSE")
    return Path(value) if value else None
