"""The harness tests and benchmarks share: process groups, /health, ports, result stamps."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from vllm_miprun.errors import ModelFolderError
from vllm_miprun.tools import assets, harness

SPAWN_GRANDCHILD = ("import subprocess, sys, time; "
                    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                    "open({pid_file!r}, 'w').write(str(p.pid)); time.sleep(60)")


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_worker_group_is_killed_on_timeout_with_its_grandchildren(tmp_path):
    """A timed-out worker takes the processes it started (vLLM's EngineCore) with it."""
    pid_file = tmp_path / "grandchild.pid"
    script = SPAWN_GRANDCHILD.format(pid_file=str(pid_file))
    with pytest.raises(subprocess.TimeoutExpired):
        harness.run_in_own_group([sys.executable, "-c", script], timeout_s=3, env=os.environ)
    grandchild = int(pid_file.read_text())
    assert _gone(grandchild), f"grandchild {grandchild} outlived its worker's timeout"


def test_worker_output_and_exit_code_come_back():
    code, out, err = harness.run_in_own_group(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        timeout_s=30, env=os.environ)
    assert (code, out.strip(), err.strip()) == (3, "out", "err")


def test_a_worker_that_exits_normally_leaves_no_orphan(tmp_path):
    """What a finished worker left running in its group (an EngineCore it did not stop) is killed too."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    code, _, err = harness.run_in_own_group([sys.executable, "-c", script], timeout_s=30, env=os.environ)
    assert code == 0, err
    grandchild = int(pid_file.read_text())
    gone = _gone(grandchild)
    if not gone:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, 9)
    assert gone, f"grandchild {grandchild} outlived its finished worker"


def _started_with_grandchild(tmp_path) -> tuple[subprocess.Popen, int]:
    pid_file = tmp_path / "grandchild.pid"
    proc = harness.start_in_own_group([sys.executable, "-c", SPAWN_GRANDCHILD.format(pid_file=str(pid_file))])
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, int(pid_file.read_text())


def test_kill_group_takes_grandchildren_and_reports_none_left(tmp_path):
    proc, grandchild = _started_with_grandchild(tmp_path)
    assert set(harness.session_pids(proc.pid)) == {proc.pid, grandchild}
    assert harness.kill_group(proc, timeout=10) == []
    assert proc.returncode is not None and _gone(grandchild)
    assert harness.session_pids(proc.pid) == []


def test_stop_group_interrupts_first(tmp_path):
    marker, ready = tmp_path / "interrupted", tmp_path / "ready"
    script = (f"import time\ntry:\n    open({str(ready)!r}, 'w').close()\n    time.sleep(60)\n"
              f"except KeyboardInterrupt:\n    open({str(marker)!r}, 'w').write('yes')\n")
    proc = harness.start_in_own_group([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:  # its SIGINT handler is in place
        time.sleep(0.05)
    assert harness.stop_group(proc, grace=10) == []
    assert marker.read_text() == "yes"  # a clean shutdown ran before any SIGKILL


def test_children_get_sigint_back_when_the_starter_ignores_it():
    """A starter run in the background (``cmd &``) ignores SIGINT; stop_group's interrupt
    must still reach the child's handler."""
    child = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    starter = ("import signal, subprocess, sys\n"
               "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
               "from vllm_miprun.tools import harness\n"
               f"proc = harness.start_in_own_group([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE)\n"
               "print(proc.communicate(timeout=60)[0].strip())\n")
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_wait_healthy_on_a_live_server_then_stop(tmp_path):
    (tmp_path / "health").write_text("ok")  # http.server answers GET /health with this file
    port = harness.free_port()
    proc = harness.start_in_own_group([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "--directory", str(tmp_path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
    try:
        seconds = harness.wait_healthy(proc, port, timeout=30)
        assert 0 <= seconds < 30
        assert harness.http_get(f"http://127.0.0.1:{port}/health") == (200, "ok")
    finally:
        assert harness.stop_group(proc, grace=10) == []


def test_wait_healthy_says_why_a_server_died():
    proc = harness.start_in_own_group([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"exited with 3 during start-up:\nthe log tail"):
        harness.wait_healthy(proc, harness.free_port(), timeout=30, failure_log=lambda: "the log tail")
    harness.kill_group(proc)


def test_wait_healthy_times_out():
    proc = harness.start_in_own_group([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match="not healthy after 2 s"):
            harness.wait_healthy(proc, harness.free_port(), timeout=2)
    finally:
        harness.kill_group(proc)


def test_free_port_can_be_bound():
    import socket

    port = harness.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_stamp_records_commit_machine_date_and_command():
    result = harness.stamp({"figure": 1.0}, argv=[str(harness.ROOT / "benchmarks" / "bench_x.py"), "--quick"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=harness.ROOT, capture_output=True, text=True).stdout.strip()
    assert result["figure"] == 1.0
    assert result["git_commit"].split("+")[0] == head
    assert result["command"] == "python benchmarks/bench_x.py --quick"
    assert result["machine"].startswith("cpu: ") and f"{os.cpu_count()} cores" in result["machine"]
    assert time.strptime(result["when"], "%Y-%m-%dT%H:%M:%SZ")
    kept = harness.stamp({"command": "python given.py"})
    assert kept["command"] == "python given.py"  # a benchmark's own command line wins


def test_git_commit_says_when_tracked_files_changed(tmp_path, monkeypatch):
    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    git("add", "tracked.txt")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    (tmp_path / "untracked.txt").write_text("not part of the commit\n")
    assert harness.git_commit() == head
    (tmp_path / "tracked.txt").write_text("two\n")
    assert harness.git_commit() == head + "+dirty"
    monkeypatch.setattr(harness, "ROOT", tmp_path / "missing")
    assert harness.git_commit() is None


def test_default_model_dir_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPRUN_HOME", str(tmp_path))
    assert harness.default_model_dir(require=False) == tmp_path / "models" / "SmolLM2-135M"
    with pytest.raises(ModelFolderError, match="assets prepare"):
        harness.default_model_dir()
    (tmp_path / "models" / "SmolLM2-135M").mkdir(parents=True)
    (tmp_path / "models" / "SmolLM2-135M" / "model.safetensors").write_bytes(b"")
    assert harness.default_model_dir() == tmp_path / "models" / "SmolLM2-135M"


def test_a_rebuilt_model_folder_replaces_the_old_one_whole(tmp_path, monkeypatch):
    """`assets prepare --force`: the new folder replaces the old by renames; a failure
    between them leaves no folder that looks complete, so the next prepare builds again."""
    target = tmp_path / "models" / "SmolLM2-135M"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("old")
    (target / "only-in-old.json").write_text("{}")

    def staged(text):
        folder = tmp_path / f"staging-{text}"
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
        return folder

    assets.install_folder(staged("new"), target)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert (target / "model.safetensors").read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["SmolLM2-135M"]  # the old one is gone

    real_replace, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(assets.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        assets.install_folder(staged("newer"), target)
    monkeypatch.setenv("MIPRUN_HOME", str(tmp_path))
    assert not (assets.smollm2_dir() / "model.safetensors").exists()
    with pytest.raises(ModelFolderError, match="assets prepare"):
        harness.default_model_dir()
    monkeypatch.setattr(assets.os, "replace", real_replace)
    assets.install_folder(staged("newest"), target)  # the next prepare: the old model set aside is gone
    assert [p.name for p in target.parent.iterdir()] == ["SmolLM2-135M"]
    assert (target / "model.safetensors").read_text() == "newest"
