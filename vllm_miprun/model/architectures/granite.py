"""Granite: embedding, residual, attention and logit multipliers (scalars); nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

GRANITE = Architecture(family="Granite", architectures=("GraniteForCausalLM",))
