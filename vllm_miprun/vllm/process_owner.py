"""Who made a folder, and whether that process is gone: enough to remove what a killed
process left behind without ever removing what a live one still uses.

A process id means something only inside one pid namespace of one boot, and ids are
reused. So an owner record names the process by its id, its start time (field 22 of
``/proc/PID/stat``) and its node: host name, boot id and pid namespace. A record made
in another node (a /tmp shared by containers of one host name, a reboot) is never judged
gone. Plain Python: no vLLM import.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

MAX_PID = 1 << 22  # Linux's pid_max ceiling


def owner_record() -> dict[str, Any]:
    """This process, as :func:`owner_gone` reads it back."""
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "node": node_id()}


def owner_gone(record: Any) -> bool:
    """Whether the process a record names has surely ended; False when it cannot be told."""
    if not isinstance(record, dict) or record.get("node") != node_id():
        return False
    pid = record.get("pid")
    if type(pid) is not int or not 0 < pid < MAX_PID:
        return False
    start = _start_time(pid)
    if start is not None:
        return start != record.get("start")  # another process now has the id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def node_id() -> str:
    """Host name, boot id and pid namespace: where a process id is meaningful."""
    return "|".join((socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"), _pid_namespace()))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # no /proc (not Linux)
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when /proc does not say."""
    text = _read_text(f"/proc/{pid}/stat")
    fields = text.rpartition(")")[2].split()  # the name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
