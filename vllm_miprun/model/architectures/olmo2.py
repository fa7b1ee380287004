"""OLMo 2: post-norms and q/k norms inside the block; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture, HealSite

# The MLP output passes post_feedforward_layernorm (gain ``w``, no offset) before the residual
# add: heal=linear acts on the norm's output and folds a diagonal map into that gain.
OLMO2 = Architecture(family="OLMo 2", architectures=("Olmo2ForCausalLM",),
                     heal_site=HealSite(output="post_feedforward_layernorm", fold_into="post_feedforward_layernorm",
                                        gain_offset=0.0))
