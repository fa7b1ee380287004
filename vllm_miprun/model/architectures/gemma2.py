"""Gemma 2: alternating sliding/full attention (``layer_types``, derived when absent),
scaled embeddings, attention-logit and final-logit soft-capping, four norms per block.

Attention soft-capping only exists in transformers' eager attention (sdpa drops it), so
the runner uses eager attention for this family, as transformers itself recommends.
"""

from vllm_miprun.model.architectures.base import Architecture, HealSite

# The MLP output passes post_feedforward_layernorm before the residual add, so heal=linear
# acts on the norm's output and folds a diagonal map into its gain, which Gemma stores as
# ``w`` and applies as ``1 + w`` (transformers' Gemma*RMSNorm and vLLM's GemmaRMSNorm alike).
GEMMA_HEAL = HealSite(output="post_feedforward_layernorm", fold_into="post_feedforward_layernorm", gain_offset=1.0)

GEMMA2 = Architecture(family="Gemma 2", architectures=("Gemma2ForCausalLM",), derived=("layer_types",),
                      renumbered=("sliding_window_pattern",), attn_implementation="eager",
                      heal_site=GEMMA_HEAL)
