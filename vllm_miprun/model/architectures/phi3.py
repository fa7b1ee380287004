"""Phi-3: fused qkv and gate-up projections inside the block; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

PHI3 = Architecture(family="Phi-3", architectures=("Phi3ForCausalLM",))
