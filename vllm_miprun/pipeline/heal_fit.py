"""The heal maps' fits: least squares per run (``heal=linear``), then, for ``heal=distill``,
all maps together on the full model's next-token distribution.

``heal=linear`` fits each run's map alone, by least squares on the residual stream. Here
those maps are only the start: all of a plan's maps together are then trained by Adam to
minimise ``KL(p_full ‖ p_pruned)`` over the calibration tokens, with every model weight
frozen. The maps keep their form (a full matrix on ``down_proj``'s output, or one scale per
channel where the family folds into a norm's gain or the weights are FP8), so they fold
into the weights exactly as ``heal=linear``'s do: the served model has no extra cost.

Why: on SmolLM2 the least-squares maps barely act at keep 0.75 (0.99× perplexity on text
unlike calibration) and a full least-squares map breaks code at keep 0.6; the distilled
full maps give 0.82× and 0.49×, with every domain better
(``benchmarks/heal_kl_research.py``, ``docs/research/healing.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vllm_miprun.core import heal_math

logger = logging.getLogger(__name__)


def block_parts(model, layer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, d)`` of a block whose output is ``r + d``: ``d`` the MLP contribution as the
    family's ``heal_site`` says it is added, ``r`` the rest (caught on its way out, so
    the block runs through the runner with the masks and rotary tables transformers gives it)."""
    site = model.family.heal_site
    caught: list[torch.Tensor] = []
    handle = layer.get_submodule(site.output).register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        out = model.run_block(layer, hidden)
    finally:
        handle.remove()
    d = torch.cat(caught)
    if site.multiplier is not None:
        d = d * getattr(model.config, site.multiplier)
    return out - d, d


@torch.inference_mode()
def least_squares_maps(model_dir: str | Path, ids: torch.Tensor, kept: list[int], starts: list[int],
                       device: str, progress: bool, recipe: dict[str, Any]) -> dict[int, torch.Tensor]:
    """One pass over the blocks: the full model's stream and the healed pruned stream side by side.

    At block ``i−1`` the pruned stream's ``(r, d)`` (or, with ``sequential`` off, the full
    stream's) waits until the full stream reaches ``h_j``; then ``T`` is fitted and the
    pruned stream continues as ``r + T d``.
    """
    from tqdm.auto import tqdm

    from vllm_miprun.model.blockwise import BlockwiseModel

    model = BlockwiseModel(model_dir, device=device)
    pruned = set(range(model.num_blocks)) - set(kept)
    runs = {i: j for i, j in heal_math.pruned_runs(sorted(pruned))}
    ends = {j: i for i, j in runs.items()}
    dense = model.embed_tokens(ids)
    healed: torch.Tensor | None = dense.clone()
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if 0 in starts:
        pending[runs[0]] = (torch.zeros_like(dense), dense.clone())  # h_j ≈ T h_0
    maps: dict[int, torch.Tensor] = {}
    for b in tqdm(range(max(runs.values())), desc="heal: fitting", disable=not progress, leave=False):
        with model.block(b) as layer:
            r_full, d_full = block_parts(model, layer, dense)
            if b not in pruned and b + 1 in starts and not recipe["sequential"]:
                pending[runs[b + 1]] = (r_full, d_full)
            elif recipe["sequential"] and b not in pruned and healed is not None:
                r, d = block_parts(model, layer, healed)
                if b + 1 in starts:
                    pending[runs[b + 1]], healed = (r, d), None
                else:
                    healed = r + d
        dense = r_full + d_full
        if b + 1 in ends:
            start = ends[b + 1]
            if start not in starts:  # left unhealed: the stream goes on from h_i
                continue
            r, d = pending.pop(b + 1)
            x, y = d.reshape(-1, d.shape[-1]), (dense - r).reshape(-1, d.shape[-1])
            weights = heal_math.token_weights(y, x, recipe["weights"])
            maps[start] = heal_math.fit_map(x.cpu(), y.cpu(), form=recipe["form"], ridge=recipe["ridge"],
                                            weights=weights)
            logger.info("heal: run [%d, %d) keeps %.3f of its unhealed error", start, b + 1,
                        heal_math.residual_share(x.cpu(), y.cpu(), maps[start]))
            healed = r + d @ maps[start].to(d).T
    return maps


def apply_map(x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``T x`` for every row of ``x``; a 1-D map is its diagonal's scales."""
    transform = transform.to(x.dtype)
    return x * transform if transform.dim() == 1 else x @ transform.T


def _dense_states(model, ids: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's stream entering block ``first`` and its last boundary state, per window."""
    with torch.no_grad():
        hidden = model.embed_tokens(ids).clone()  # an inference tensor: cloned into a normal one
        entering = hidden
        for index in range(model.num_blocks):
            if index == first:
                entering = hidden
            with model.block(index) as layer:
                hidden = model.block_forward(layer, hidden)
    return entering, hidden


def _pruned_final(model, hidden: torch.Tensor, blocks: list[int], params: dict[int, torch.Tensor]) -> torch.Tensor:
    """The healed pruned stream from ``hidden`` through ``blocks``: the map of the run starting
    at ``b + 1`` scales block ``b``'s MLP contribution (its ``heal_site`` output)."""
    site = model.family.heal_site
    if 0 in params:
        hidden = apply_map(hidden, params[0])
    for index in blocks:
        with model.block(index) as layer:  # loaded frozen (BlockwiseModel._materialise): only the maps train
            handle = None
            if index + 1 in params:
                handle = layer.get_submodule(site.output).register_forward_hook(
                    lambda module, args, out, t=params[index + 1]: apply_map(out, t))
            try:
                hidden = model.block_forward(layer, hidden)
            finally:
                if handle is not None:
                    handle.remove()
    return hidden


class HealedKL:
    """Mean ``KL(p_full ‖ p_healed)`` of the next token on calibration windows, for maps of
    the runs starting at ``starts``: the distillation's loss (differentiable in the maps)."""

    def __init__(self, model_dir: str | Path, ids: torch.Tensor, kept: list[int], starts: list[int],
                 device: str = "cpu"):
        from vllm_miprun.model.blockwise import BlockwiseModel

        self.model = BlockwiseModel(model_dir, device=device, resident_blocks=True)
        # The full model's stream is the pruned one's up to the first pruned block, or up to the
        # block a map folds into (the one before its run). A pruned run left unhealed (block 0
        # with tied embeddings) can come before every map: the stream starts there, not past it.
        first_pruned = min(set(range(self.model.num_blocks)) - set(kept))
        first = max(0, min(first_pruned, min(starts) - 1))
        self.entering, self.final = _dense_states(self.model, ids.to(device), first)
        self.blocks = [b for b in kept if b >= first]

    def __call__(self, params: dict[int, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(self.final)) if rows is None else rows
        with torch.no_grad():
            teacher = torch.log_softmax(self.model.next_token_logits(self.final[rows]), dim=-1)
        healed = _pruned_final(self.model, self.entering[rows], self.blocks, params)
        student = torch.log_softmax(self.model.next_token_logits(healed), dim=-1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean()


def distill_maps(model_dir: str | Path, ids: torch.Tensor, kept: list[int], maps: dict[int, torch.Tensor],
                 recipe: dict[str, Any], device: str = "cpu", progress: bool = True) -> dict[int, torch.Tensor]:
    """``maps`` (``{run start: T}``, the least-squares start) trained on the next-token KL."""
    from tqdm.auto import tqdm

    objective = HealedKL(model_dir, ids, kept, sorted(maps), device)
    form = recipe["form"]
    params = {start: (t if form == "full" else heal_math.compact(t)).float().to(device).clone().requires_grad_(True)
              for start, t in maps.items()}  # cloned: the least-squares maps are inference tensors
    optimiser = torch.optim.Adam(list(params.values()), lr=recipe["lr"][form])
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in tqdm(range(recipe["steps"]), desc="heal: distilling", disable=not progress, leave=False):
        loss = objective(params, torch.randperm(len(ids), generator=order)[:recipe["batch"]])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    head, tail = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    logger.info("heal: distilled %d map(s) in %d steps; next-token KL on calibration batches %.3f -> %.3f nats",
                len(params), len(losses), head, tail)
    return {start: (p.detach().cpu() if form == "full" else torch.diag(p.detach().cpu())) for start, p in params.items()}
