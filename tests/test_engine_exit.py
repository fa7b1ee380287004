"""engine_exit: a process that ran an in-process engine leaves past the interpreter's
teardown on success (its output flushed), an interrupted one with nothing else running
does too, and every other takes the normal path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
atexit.register(lambda: print("TEARDOWN", flush=True))
if {engine}:  # what `from vllm import LLM` leaves behind
    sys.modules["vllm.entrypoints.llm"] = type(sys)("vllm.entrypoints.llm")
if {ray}:  # what `import ray` leaves behind
    sys.modules["ray"] = type(sys)("ray")
from vllm_miprun.vllm.engine_exit import finish
print("RESULT")  # block-buffered into the pipe: only a flush gets it out before os._exit
sys.stderr.write("LOGGED\\n")
finish({code})
"""


@pytest.mark.parametrize(("engine", "ray", "code", "teardown"), [
    (True, False, 0, False),     # success after an engine: straight out, output kept
    (True, False, 3, True),      # a failure keeps vLLM's exit hooks (the engine may still be up)
    (False, False, 0, True),     # no engine: a plain exit
    (False, False, 130, False),  # interrupted, nothing else running: straight out (teardown may abort)
    (True, False, 130, True),    # interrupted with an engine: vLLM's exit hooks stop it
    (False, True, 130, True),    # interrupted with Ray: its exit hooks stop its processes
])
def test_finish_skips_the_teardown_only_where_nothing_is_left_to_stop(engine, ray, code, teardown):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # else nothing waits for a flush
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(engine=engine, ray=ray, code=code)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith("RESULT\n") and "LOGGED" in proc.stderr
    assert ("TEARDOWN" in proc.stdout) is teardown


@pytest.mark.parametrize("leave", ["exit_after_engine(0)", "sys.exit(0)"])
def test_every_run_folder_made_here_is_removed_however_the_process_leaves(tmp_path, leave):
    """``os._exit`` runs no atexit hook, the run folders' removal included: a CLI run or a
    script that ends this way must not leave its folder for the next start to sweep. A
    process whose folder was unset under it makes a second one; both go."""
    script = ("import os, sys\n"
              "from vllm_miprun.vllm import reports\n"
              "from vllm_miprun.vllm.engine_exit import exit_after_engine\n"
              "print(reports.run_dir(create=True))\n"
              "del os.environ[reports.RUN_DIR_ENV]\n"
              "print(reports.run_dir(create=True), flush=True)\n"
              f"{leave}\n")
    env = {k: v for k, v in os.environ.items() if k != "MIPRUN_RUN_DIR"} | {"TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    made = proc.stdout.split()
    assert len(set(made)) == 2 and all(path.startswith(str(tmp_path / "vllm-miprun-run-")) for path in made), made
    assert not list(tmp_path.iterdir())
