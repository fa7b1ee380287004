"""Granite: embedding, residual, attention and logit multipliers (scalars); nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture, HealSite

# The block adds ``residual_multiplier · mlp(x)``: heal=linear fits its map on that product, and
# a map commutes with the scalar, so it folds into down_proj as for Llama.
GRANITE = Architecture(family="Granite", architectures=("GraniteForCausalLM",),
                       heal_site=HealSite(multiplier="residual_multiplier"))
