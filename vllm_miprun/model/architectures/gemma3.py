"""Gemma 3 (text): ``layer_types`` derived from ``sliding_window_pattern`` when absent, a
rotary embedding per layer type, scaled embeddings, q/k norms and four norms per block.

``sliding_window_pattern`` is only read when ``layer_types`` is missing; the pruned
config always carries the sliced ``layer_types``, so the pattern is left as it is.
"""

from vllm_miprun.model.architectures.base import Architecture
from vllm_miprun.model.architectures.gemma2 import GEMMA_HEAL

GEMMA3 = Architecture(family="Gemma 3 (text)", architectures=("Gemma3ForCausalLM",), derived=("layer_types",),
                      renumbered=("sliding_window_pattern",),
                      heal_site=GEMMA_HEAL)
