"""Qwen3: Qwen2's sliding-window threshold, plus q/k norms inside the block."""

from vllm_miprun.model.architectures.base import Architecture
from vllm_miprun.model.architectures.qwen2 import renumber_max_window_layers

QWEN3 = Architecture(family="Qwen3", architectures=("Qwen3ForCausalLM",), renumber=renumber_max_window_layers)
