"""Every architecture family miprun can prune, in one table.

Each family's quirks live in its own small module (as in vLLM's ``models/``); this
table is the one place that says which architectures are supported. Calibration
(``model.blockwise``), the config and weight remap (``model.remap``), weight reading
(``model.weights``), export and evaluation all look a model up here.
"""

from __future__ import annotations

import re
from typing import Any

from vllm_miprun.model.architectures.base import Architecture
from vllm_miprun.model.architectures.cohere2 import COHERE2
from vllm_miprun.model.architectures.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from vllm_miprun.model.architectures.gemma2 import GEMMA2
from vllm_miprun.model.architectures.gemma3 import GEMMA3
from vllm_miprun.model.architectures.granite import GRANITE
from vllm_miprun.model.architectures.llama import LLAMA
from vllm_miprun.model.architectures.llama4 import LLAMA4
from vllm_miprun.model.architectures.mistral import MISTRAL
from vllm_miprun.model.architectures.mixtral import MIXTRAL
from vllm_miprun.model.architectures.olmo2 import OLMO2
from vllm_miprun.model.architectures.phi3 import PHI3
from vllm_miprun.model.architectures.qwen2 import QWEN2
from vllm_miprun.model.architectures.qwen3 import QWEN3
from vllm_miprun.model.architectures.qwen3_moe import QWEN3_MOE
from vllm_miprun.options import OptionError

FAMILIES: tuple[Architecture, ...] = (
    LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, COHERE2, PHI3, OLMO2, GRANITE,
    MIXTRAL, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3, LLAMA4,
)
BY_ARCHITECTURE: dict[str, Architecture] = {name: fam for fam in FAMILIES for name in fam.architectures}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_ARCHITECTURE)

# Block N's tensors, whichever family: f"{prefix}{N}.{rest}".
_PREFIXES = sorted({fam.layers_prefix for fam in FAMILIES}, key=len, reverse=True)
LAYER_NAME = re.compile(r"^(" + "|".join(re.escape(p) for p in _PREFIXES) + r")(\d+)(\..+)$")

__all__ = ["Architecture", "BY_ARCHITECTURE", "FAMILIES", "LAYER_NAME", "SUPPORTED_ARCHITECTURES",
           "architecture_name", "for_config"]


def architecture_name(hf_config: dict[str, Any]) -> str:
    """The single supported architecture ``hf_config`` declares; refuse anything else."""
    archs = hf_config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in BY_ARCHITECTURE:
        raise OptionError(
            f"miprun supports the architectures {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"this model declares architectures={archs!r}. Serve it without "
            "--load-format miprun, or open an issue for this architecture"
        )
    return archs[0]


def for_config(hf_config: dict[str, Any]) -> Architecture:
    """The family of ``hf_config``, after its static checks; refused before any work."""
    family = BY_ARCHITECTURE[architecture_name(hf_config)]
    if family.check is not None:
        family.check(hf_config)
    return family
