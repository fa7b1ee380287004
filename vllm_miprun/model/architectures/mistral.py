"""Mistral: one scalar sliding window for every block; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

MISTRAL = Architecture(family="Mistral", architectures=("MistralForCausalLM",))
