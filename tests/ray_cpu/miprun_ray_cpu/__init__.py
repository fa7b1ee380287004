"""Test-only vLLM platform plugin: vLLM's CPU platform, able to place its workers with Ray.

vLLM 0.32's ``CpuPlatform`` declares no Ray device key, so ``--distributed-executor-backend
ray`` stops on CPU with "current platform cpu does not support ray". The platform here is
the CPU platform with Ray device key ``GPU``: the test's Ray cluster declares one (fake)
GPU per worker, Ray gives each worker actor one, and the workers run vLLM's CPU worker
as usual. Everything else (executor, actors, environment copying, config shipping) is
vLLM's and Ray's own code. Active only in processes whose ``PYTHONPATH`` holds
``tests/ray_cpu`` (the entry point is in ``miprun_ray_cpu-0.1.dist-info``).
"""


def platform() -> str:
    """The ``vllm.platform_plugins`` entry point: this platform's class."""
    return "miprun_ray_cpu.platform.CpuRayPlatform"
