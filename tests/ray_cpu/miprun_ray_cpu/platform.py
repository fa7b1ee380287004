"""The CPU platform with a Ray device key (see the package docstring)."""

from vllm.platforms.cpu import CpuPlatform


class CpuRayPlatform(CpuPlatform):
    ray_device_key: str = "GPU"
