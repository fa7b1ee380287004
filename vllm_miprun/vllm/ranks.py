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


def disagreement(plans: Sequence[Any]) -> str | None:
    """A one-line description of the ranks whose plan differs from rank 0's, or None."""
    differ = [rank for rank, plan in enumerate(plans) if plan != plans[0]]
    if not differ:
        return None
    shown = "; ".join(f"rank {rank} kept {plans[rank]}" for rank in [0, *differ])
    return (f"ranks planned different blocks ({shown}); give every rank the same score cache "
            "(cache_dir on a shared disk, or --miprun-scores FILE), or plan once with --miprun-drop")


def check_ranks_agree(kept: Sequence[int]) -> None:
    """All-gather ``kept`` over each model-parallel group (tensor, pipeline) of vLLM, or the
    default process group when vLLM's groups are not set up; raise when any rank differs.
    Nothing to do in a single process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    for group in _groups():
        plans: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(plans, list(kept), group=group)
        problem = disagreement(plans)
        if problem:
            raise RankPlanError(problem)


def _groups() -> list[Any]:
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return [parallel_state.get_tp_group().cpu_group, parallel_state.get_pp_group().cpu_group]
    return [None]  # torch's default group
