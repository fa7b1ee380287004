"""Serve float32, not emulated bfloat16, on CPUs without native bfloat16.

With ``--dtype auto`` (the default) vLLM serves bfloat16 on x86 CPUs. Without
AVX512-BF16 or AMX-BF16 that bfloat16 is emulated: on this project's AVX2 machine prefill
was about 7x slower than float32 (README, Speed). For a model served with
``--load-format miprun`` and no ``--dtype``, the plugin therefore picks float32 on such a
CPU and logs one line saying why. An explicit ``--dtype`` always wins; other models keep
vLLM's own default (README, "The vllm command").
"""

from __future__ import annotations

from pathlib import Path

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

# /proc/cpuinfo flags that mean bfloat16 arithmetic in hardware: x86 and aarch64 ("Features").
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    """The first ``flags`` (x86) or ``Features`` (aarch64) line's words; None if there is none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """This machine's CPU flags, or None where ``/proc/cpuinfo`` is missing or says nothing."""
    try:
        return parse_cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return None


def choose_dtype(requested: object, on_cpu: bool,
                 cpu_flags: frozenset[str] | None) -> tuple[object, str | None]:
    """The dtype to serve and, when it differs from ``requested``, why (pure).

    Only ``auto`` on a CPU whose flags are known and lack native bfloat16 becomes
    ``float32``; anything else (an explicit dtype, a GPU, unknown flags) is kept.
    """
    if not (isinstance(requested, str) and requested.lower() == "auto"):
        return requested, None
    if not on_cpu or cpu_flags is None or cpu_flags & NATIVE_BF16_FLAGS:
        return requested, None
    return "float32", (
        "miprun: serving float32 because this CPU has no native bfloat16 (no avx512_bf16 or "
        "amx_bf16 flag), where vLLM's default bfloat16 runs emulated and several times slower; "
        "pass --dtype to choose another"
    )


def apply_cpu_dtype_default(engine_args) -> None:
    """Set ``engine_args.dtype`` to float32 where bfloat16 would be emulated, with one log line."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    dtype, reason = choose_dtype(engine_args.dtype, on_cpu, read_cpu_flags() if on_cpu else None)
    if reason is not None:
        engine_args.dtype = dtype
        logger.info(reason)
