"""Mixtral: every block is a sparse MoE block; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

MIXTRAL = Architecture(family="Mixtral", architectures=("MixtralForCausalLM",))
