"""Gemma 2: alternating sliding/full attention (``layer_types``, derived when absent),
scaled embeddings, attention-logit and final-logit soft-capping, four norms per block.

Attention soft-capping only exists in transformers' eager attention (sdpa drops it), so
the runner uses eager attention for this family, as transformers itself recommends.
"""

from vllm_miprun.model.architectures.base import Architecture

GEMMA2 = Architecture(family="Gemma 2", architectures=("Gemma2ForCausalLM",), derived=("layer_types",),
                      renumbered=("sliding_window_pattern",), attn_implementation="eager",
                      heal_refusal="its MLP output passes post_feedforward_layernorm before the residual add")
