"""The pruned model takes weights in the full checkpoint's names: first load, reload, pushes.

vLLM hands a model weights through one method, ``model.load_weights(iterable of (name,
tensor))``: at the first load, in ``reload_weights`` (after ``sleep(level=2)``, or an RL
update read from disk) and in the weight-transfer engines' ``update_weights`` (an RL trainer
pushing tensors). The names are the checkpoint's. The miprun loader replaces that method on
the pruned model with :class:`FullModelNames`, so every path behaves alike: block
``kept[j]`` of the full model becomes block ``j``, the pruned blocks' tensors are dropped
(logged), and the heal maps are folded into the ``down_proj`` they belong to.

Why full-model names for a push: the trainer holds the checkpoint vLLM was started from,
and sends its tensors under its own names. A name in the pruned numbering would be
ambiguous (``model.layers.3`` is a different block in each numbering); the full numbering
is the one the served checkpoint, the plan and the reports use. Kernel-format reloads
(``is_checkpoint_format=False``) bypass ``load_weights`` and name the served model's own
parameters, in the pruned numbering.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.logger import init_logger

from vllm_miprun.core import heal_math
from vllm_miprun.model.architectures.base import HealSite
from vllm_miprun.model.remap import index_map, layer_index, renamed_weight
from vllm_miprun.pipeline import heal

logger = init_logger(f"vllm.{__name__}")


class FullModelNames:
    """A model's ``load_weights`` that takes the full checkpoint's names (see the module doc)."""

    def __init__(self, load_weights, kept: list[int], num_blocks: int, maps: dict[int, torch.Tensor],
                 site: HealSite):
        self.pruned_load_weights = load_weights  # the model's own method, pruned numbering
        self.kept = list(kept)
        self.num_blocks = num_blocks
        self.maps = {start: heal_math.compact(t) for start, t in maps.items()}  # diagonal: [d]
        self.site = site  # where the family's maps fold

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]):
        dropped: set[int] = set()
        loaded = self.pruned_load_weights(
            heal.fold_stream(renumbered(weights, self.kept, dropped), self.maps, self.kept, complete=False,
                              site=self.site))
        if dropped:
            logger.info("miprun: dropped the weights of pruned blocks %s (full-model numbering; kept %s)",
                        sorted(dropped), self.kept)
        return loaded


def renumbered(weights: Iterable[tuple[str, torch.Tensor]], kept: list[int],
               dropped: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-model names renumbered to the kept blocks; a pruned block's index goes to ``dropped``."""
    mapping = index_map(kept)
    for name, tensor in weights:
        new_name = renamed_weight(name, mapping)
        if new_name is None:
            dropped.add(layer_index(name))
            continue
        yield new_name, tensor


def take_full_model_names(model, kept: list[int], num_blocks: int, maps: dict[int, torch.Tensor],
                          site: HealSite) -> None:
    """Make ``model.load_weights`` take full-model names; idempotent (a second load keeps the
    model's own method underneath, so names are never renumbered twice)."""
    current = model.load_weights
    own = current.pruned_load_weights if isinstance(current, FullModelNames) else current
    model.load_weights = FullModelNames(own, kept, num_blocks, maps, site)
