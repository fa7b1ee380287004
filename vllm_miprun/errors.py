"""The one error base class, and how every entry point reports it: one line, exit status 2.

``vllm-miprun`` (every subcommand, ``export``, ``eval`` and ``profile`` included) and
``python -m vllm_miprun.tools.evaluate`` run their work through :func:`run_command`.
``vllm serve``'s front process reports the same errors as one line with exit status 1
(``vllm_miprun.vllm.engine_args``), before any engine process exists.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class MiprunError(ValueError):
    """Bad input: the message says what was expected, what was given and what to do."""


class OptionError(MiprunError):
    """A user option is invalid."""


class ModelFolderError(OptionError):
    """The model folder is missing something the project needs (config, safetensors, tokenizer)."""


class CacheError(MiprunError):
    """A score cache or one of its sidecars is missing, corrupt or belongs to other weights."""


class CorpusError(MiprunError):
    """Calibration text is missing, unreadable or too short."""


class EvalError(MiprunError):
    """An evaluation request is invalid."""


# Reported as one line: MiprunError, and what code below the project raises about the
# user's input: ValueError (MiprunError's base) and a missing or unreadable file.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# Signals an entry point was sent (see :func:`interrupt`).
_SIGNALLED: list[int] = []


def interrupt(signum, frame) -> None:
    """Signal handler for Ctrl-C and SIGTERM: remember the signal, then unwind like Ctrl-C.

    The KeyboardInterrupt is raised wherever Python happens to be, and C code it passes
    through (torch inferring a shape, a finalizer) can turn it into another error or drop
    it; the record lets :func:`run_command` and :func:`check_interrupted` still stop."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal came whose own KeyboardInterrupt was lost. Called
    between blocks of long passes, where stopping is always safe."""
    if _SIGNALLED:
        raise KeyboardInterrupt


@contextmanager
def interruptible_in_event_loop() -> Iterator[None]:
    """Ctrl-C stops blocking work done inside a running asyncio event loop (``vllm serve``
    plans there, in its front process, before the engine starts).

    The runner ``vllm serve`` runs under answers a first Ctrl-C only by cancelling its main
    task, which a minute of calibration never yields to, so the plan and then the engine's
    start ran to their end before the process stopped. Here SIGINT unwinds at once, as
    :func:`interrupt`, and a signal whose KeyboardInterrupt something swallowed still
    stops the work at its end.
    Elsewhere (no loop, another thread, SIGINT ignored) the process's own handler stays."""
    if (threading.current_thread() is not threading.main_thread() or not _event_loop_running()
            or signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.default_int_handler, interrupt)):
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    already = len(_SIGNALLED)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        came = len(_SIGNALLED) > already
        del _SIGNALLED[already:]  # a caller that catches the interrupt may plan again
    if came:
        raise KeyboardInterrupt


def _event_loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_command(prog: str, command: Callable[[], int],
                also: tuple[type[BaseException], ...] = (),
                wording: Callable[[str], str] | None = None) -> int:
    """Run an entry point's work; a user error (or one of ``also``) becomes one line on
    stderr and exit status 2, Ctrl-C or SIGTERM one line and 130. No traceback.
    ``wording`` rewrites the line for the entry point (its own flag names)."""
    try:
        return command()
    except USER_ERRORS + also as err:
        if _SIGNALLED:  # the signal's KeyboardInterrupt, turned into this error on its way out
            return _report_interrupt(prog)
        message = " ".join(str(err).splitlines())  # one line, even for a multi-line message
        message = wording(message) if wording is not None else message
        sys.stderr.write(f"{prog}: error: {message}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return _report_interrupt(prog)


def _report_interrupt(prog: str) -> int:
    sys.stderr.write(f"{prog}: interrupted; nothing was written\n")
    return EXIT_INTERRUPTED
