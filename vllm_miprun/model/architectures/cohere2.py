"""Cohere2: ``layer_types`` derived from ``sliding_window_pattern`` when absent."""

from vllm_miprun.model.architectures.base import Architecture

COHERE2 = Architecture(family="Cohere2", architectures=("Cohere2ForCausalLM",), derived=("layer_types",),
                       renumbered=("sliding_window_pattern",))
