"""The one harness that tests and benchmarks share to run servers and engines.

Starting a process in its own process group (session), waiting for a server's
``/health``, killing the whole group (vLLM's EngineCore is a grandchild that would
otherwise outlive its parent), listing what is left of a group, picking a free port,
stamping a result JSON with where and how it was made, and finding the default model.
No vLLM import: the processes started here import it, this module never does.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vllm_miprun.errors import ModelFolderError

ROOT = Path(__file__).resolve().parents[2]  # the repository (for git and relative commands)
LOCALHOST = "127.0.0.1"
# Never send a local health check through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def start_in_own_group(argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdout=None,
                       stderr=None, cwd: str | Path | None = None, text: bool = True) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new session, so :func:`kill_group` takes its
    whole tree. ``stdout``/``stderr`` as for ``Popen``; stdin is closed.

    A process started in the background (``cmd &``) ignores SIGINT, and its children
    inherit that, so :func:`stop_group`'s interrupt would reach no handler. The child has
    its own session, away from any terminal's Ctrl-C, so it gets the default back."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            env=dict(env) if env is not None else None, cwd=cwd, text=text,
                            start_new_session=True, preexec_fn=_default_sigint if ignored else None)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_own_group(argv: Sequence[str], timeout_s: float,
                     env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``argv`` to the end in a new session: (exit status, stdout, stderr).

    The whole group is killed on timeout or interrupt (the exception is re-raised), and
    once more after a normal exit: anything the child left in its group is an orphan.
    """
    proc = start_in_own_group(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException:
        signal_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> list[int]:
    """SIGKILL ``proc``'s process group (grandchildren included), reap ``proc``, and
    return the processes still alive in its session after ``timeout`` seconds."""
    signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    left = session_pids(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_pids(proc.pid)
    return left


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> list[int]:
    """SIGINT first (a server's clean shutdown), then :func:`kill_group`; what was left."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    return kill_group(proc)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET, never through a proxy."""
    with _DIRECT.open(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 300.0,
                 failure_log: Callable[[], str] | None = None) -> float:
    """Seconds until ``http://127.0.0.1:port/health`` answers 200.

    Raises ``RuntimeError`` when the server exits first or ``timeout`` runs out, with
    ``failure_log()`` (e.g. the tail of the server's log) in the message.
    """
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} during start-up:\n"
                               f"{failure_log() if failure_log else ''}")
        try:
            if http_get(f"http://{LOCALHOST}:{port}/health", timeout=2)[0] == 200:
                return time.monotonic() - begin
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s:\n"
                       f"{failure_log() if failure_log else ''}")


def machine_name(device: str = "cpu") -> str:
    """A one-line description of the machine: the CPU model and cores, or the GPU."""
    if device.startswith("cuda"):
        try:
            import torch

            return f"cuda: {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - best effort description
            return "cuda"
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model}, {os.cpu_count()} cores"


def git_commit() -> str | None:
    """The repository's HEAD commit, with ``+dirty`` when tracked files changed; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a command a reader can paste (script path relative to the repo)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        with contextlib.suppress(ValueError):
            argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    return " ".join(["python", *argv])


def stamp(result: dict[str, Any], *, device: str = "cpu", argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Add ``command``, ``git_commit``, ``machine`` and ``when`` (UTC) to a result dict (in place)."""
    result.setdefault("command", command_line(argv))
    result["git_commit"] = git_commit()
    result["machine"] = machine_name(device)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def default_model_dir(require: bool = True, prepare: bool = False) -> Path:
    """The model tests and benchmarks use when none is given: the converted SmolLM2-135M.

    With ``prepare``, convert it first if needed (minutes, once). With ``require``, raise
    ``ModelFolderError`` when it has not been converted.
    """
    from vllm_miprun.tools.assets import prepare_smollm2, smollm2_dir

    path = prepare_smollm2() if prepare else smollm2_dir()
    if require and not (path / "model.safetensors").is_file():
        raise ModelFolderError(f"{path} holds no converted SmolLM2; run scripts/setup.sh or "
                               "`python -m vllm_miprun.tools.assets prepare` once")
    return path
