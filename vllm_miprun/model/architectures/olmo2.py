"""OLMo 2: post-norms and q/k norms inside the block; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

OLMO2 = Architecture(family="OLMo 2", architectures=("Olmo2ForCausalLM",),
                     heal_refusal="its MLP output passes post_feedforward_layernorm before the residual add")
