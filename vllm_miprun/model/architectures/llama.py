"""Llama: the reference decoder; nothing to renumber."""

from vllm_miprun.model.architectures.base import Architecture

LLAMA = Architecture(family="Llama", architectures=("LlamaForCausalLM",))
