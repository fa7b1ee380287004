"""engine_exit: a process that ran an in-process engine leaves past the interpreter's
teardown on success (its output flushed), and takes the normal path otherwise."""

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
from vllm_miprun.vllm.engine_exit import finish
print("RESULT")  # block-buffered into the pipe: only a flush gets it out before os._exit
sys.stderr.write("LOGGED\\n")
finish({code})
"""


@pytest.mark.parametrize(("engine", "code", "teardown"), [
    (True, 0, False),   # success after an engine: straight out, output kept
    (True, 3, True),    # a failure keeps vLLM's exit hooks (the engine may still be up)
    (False, 0, True),   # no engine: a plain exit
])
def test_finish_skips_teardown_only_after_an_engine_succeeded(engine, code, teardown):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # else nothing waits for a flush
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(engine=engine, code=code)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith("RESULT\n") and "LOGGED" in proc.stderr
    assert ("TEARDOWN" in proc.stdout) is teardown
