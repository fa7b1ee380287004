"""The test side of spawned engines: their environment, and running ``engine_runner.py``.

Every test that starts vLLM in a subprocess builds its environment with ``engine_env`` and,
where it runs ``engine_runner.py``, reads the result lines with ``run_engines``: one result
line format (``RESULT_MARK`` + JSON), one writer (``emit``) and one parser (``read_results``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

RESULT_MARK = "MIPRUN_RESULT "
RUNNER = Path(__file__).with_name("engine_runner.py")
VLLM = Path(sys.executable).parent / "vllm"  # the `vllm` command of this environment


def engine_env(*, without: Iterable[str] = (), scrub_miprun: bool = False, path_first: Iterable[str | Path] = (),
               **extra: str) -> dict[str, str]:
    """This process's environment for a spawned engine, without ``VLLM_CPU_KVCACHE_SPACE`` (it would
    override kv_cache_memory_bytes) and the variables named in ``without``; without every
    ``MIPRUN_*`` variable when ``scrub_miprun``; ``path_first`` ahead of ``PYTHONPATH``; then ``extra``."""
    dropped = {"VLLM_CPU_KVCACHE_SPACE", *without}
    env = {key: value for key, value in os.environ.items()
           if key not in dropped and not (scrub_miprun and key.startswith("MIPRUN_"))}
    if path_first:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, path_first), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def emit(result: dict) -> None:
    """One result line on stdout (the runner's side)."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def read_results(out: str) -> list[dict]:
    """Every result line in ``out``, in order (vLLM's own output is skipped)."""
    return [json.loads(line[len(RESULT_MARK):]) for line in out.splitlines() if line.startswith(RESULT_MARK)]


def run_engines(specs: list[dict], timeout: int = 900, env: dict[str, str] | None = None, **extra: str) -> list[dict]:
    """Run ``specs`` through ``engine_runner.py`` in one fresh process; one result dict per spec.
    The process's environment: ``env`` (default ``engine_env()``) updated with ``extra``."""
    from vllm_miprun.tools import harness

    env = {**(env if env is not None else engine_env()), **extra}
    returncode, out, err = harness.run_in_own_group([sys.executable, str(RUNNER), json.dumps(specs)], timeout, env)
    results = read_results(out)
    # vLLM's engine core prints its traceback to stdout, the runner's own errors go to stderr
    assert returncode == 0 and len(results) == len(specs), f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
    return results
