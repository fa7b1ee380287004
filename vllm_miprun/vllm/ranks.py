"""Ranks that planned on their own must have made the same plan.

When the engine config reaches the workers unplanned, every tensor- and pipeline-parallel
rank plans by itself (the score cache's locks make one rank compute and the others read).
Ranks on other nodes read other caches, and a model whose ranks keep different blocks
would load shards that do not fit together, so the kept lists are compared over the
model-parallel groups and a disagreement is refused before any weight is read.
"""

from __future__ import annotations

from typing import Any, Sequence

from vllm_miprun.errors import MiprunError


class RankPlanError(MiprunError):
    """Ranks of one model planned different blocks."""


def disagreement(plans: Sequence[tuple[Sequence[int], str | None]]) -> str | None:
    """A one-line description of the ranks whose (kept, digest) differs from rank 0's, or None."""
    differ = [rank for rank, plan in enumerate(plans) if plan != plans[0]]
    if not differ:
        return None
    shown = "; ".join(f"rank {rank} {_described(plans[rank])}" for rank in [0, *differ])
    return (f"ranks hold different miprun plans ({shown}); give every rank the same score cache "
            "(cache_dir on a shared disk, or --miprun-scores FILE), or plan once with --miprun-drop")


def _described(plan: tuple[Sequence[int], str | None]) -> str:
    kept, digest = plan
    return f"kept {list(kept)}" + (f", plan digest {digest}" if digest else "")


def check_ranks_agree(kept: Sequence[int], digest: str | None = None, group: Any = None) -> None:
    """All-gather (kept, digest) over the engine's ranks (vLLM's world group, or ``group``, or
    torch's default group when vLLM's are not set up); raise when any rank differs. Ranks
    that each planned (torchrun, a config that reached the workers unplanned) are caught
    here, before any weight is read. Nothing to do in a single process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    group = group if group is not None else _world_group()
    plans: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(plans, (list(kept), digest), group=group)
    problem = disagreement([(list(k), d) for k, d in plans])
    if problem:
        raise RankPlanError(problem)


def _world_group() -> Any:
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_world_group().cpu_group
    return None  # torch's default group
