"""Every environment variable the project reads, with its parser and default.

The README's option table lists the same names; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARS: dict[str, str] = {
    "MIPRUN_HOME": "root of converted models and score caches (default ~/.cache/vllm-miprun)",
    "MIPRUN_CACHE_DIR": "where score caches are written (default $MIPRUN_HOME/scores)",
    "MIPRUN_RUN_DIR": "internal: the report folder the front process hands to vLLM's processes for metrics; do not set",
    "MIPRUN_TEST_WRITE_PAUSE": "tests only: a file path; every cache-folder write names its fsynced temp file there "
                               "and waits 10 min before its rename, so a test can kill it inside the write window",
}


def home() -> Path:
    value = os.environ.get("MIPRUN_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vllm-miprun"


def cache_dir() -> Path:
    value = os.environ.get("MIPRUN_CACHE_DIR")
    return Path(value).expanduser() if value else home() / "scores"


def write_pause_hook() -> Path | None:
    value = os.environ.get("MIPRUN_TEST_WRITE_PAUSE")
    return Path(value) if value else None
