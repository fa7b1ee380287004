"""Granite: embedding, residual, attention and logit multipliers (scalars); nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

GRANITE = Architecture(family="Granite", architectures=("GraniteForCausalLM",),
                       heal_refusal="its MLP output is scaled by residual_multiplier before the residual add")
