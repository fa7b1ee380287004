"""LoRA adapters and speculative-decoding drafts next to a pruned model.

LoRA. vLLM matches adapter weights to modules by name, so without help an adapter's
layer ``i`` would land on kept block ``i`` (another block of the full model), and its
layers >= K would vanish. vLLM 0.32 reads two model attributes each time it loads an
adapter (``WorkerLoRAManager._load_adapter``): ``hf_to_vllm_mapper``, whose renames are
applied to every adapter weight name, and ``lora_skip_prefixes``, whose names are skipped
before anything is read. The loader sets both on the pruned model: kept block ``kept[j]``
is renamed to ``j``, and the pruned blocks' weights are skipped, with a log line that
names the blocks. Only when LoRA is enabled, and after the base weights are loaded. The
renumbering lives only in the mapper's ``get_rename_mapper`` (what LoRA reads): families
whose ``load_weights`` apply ``hf_to_vllm_mapper`` themselves must not renumber base
weights a second time on a reload.

Speculative decoding. The draft model is loaded with the target's load config unless
``speculative_config.draft_load_config`` is set, so it reaches the miprun loader. The
loader recognises it (its ``ModelConfig`` is the speculative config's draft one, or its
runner is ``draft``) and hands it to vLLM's ``DefaultModelLoader`` unpruned. The target's
pruned config fields travel in dict ``hf_overrides``, which vLLM never applies to a draft.
A DeepSeek MTP draft comes from the target's own checkpoint and reads only the tensors
outside its stack: it is given those shards by name, so block-only shards stay unfetched.

EAGLE-3 drafts read the target's residual stream at given depths: aux layer ``t`` is the
state after ``t`` decoder blocks (``EagleModelMixin``), in the full model's numbering (the
draft's ``eagle_aux_hidden_state_layer_ids``, else ``(2, L // 2, L - 3)``). The loader
renumbers them on the pruned target: depth ``t`` of the full model is the state after the
kept blocks below ``t``, the same stream a pruned run passes on unchanged. Two depths that
fall into one pruned run would become one state, and the draft would get fewer inputs than
it was trained on, so that is refused in one line. The other drafts that read hidden states
(DFlash and its DFlash2, XPress and LiLiCorr drafts, DSpark, ``extract_hidden_states``)
reach the same setter: vLLM (0.32 to 0.34) turns their ``target_layer_ids`` (block outputs,
0-based) into depths ``id + 1`` in ``get_eagle3_aux_layers_from_config`` and calls the
target's ``set_aux_hidden_state_layers`` from one place, so they are renumbered alike.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

from vllm.logger import init_logger

from vllm_miprun.errors import OptionError
from vllm_miprun.model.checkpoint import INDEX_NAME
from vllm_miprun.model.remap import FULL_FIELD, KEPT_FIELD
from vllm_miprun.vllm import model_files

logger = init_logger(f"vllm.{__name__}")

BLOCK_PREFIX = "model.layers."  # the decoder blocks' weight-name prefix (as in model.remap)
# Drafts that read no block of the target's stack: vLLM's DeepSeek MTP loads the layers past
# it (>= num_hidden_layers) and the embedding. The only MTP draft of a supported family.
STACK_FREE_DRAFTS = ("deepseek_mtp",)


def is_draft(vllm_config, model_config) -> bool:
    """Whether ``model_config`` is a speculative-decoding draft, not the served model."""
    if getattr(model_config, "runner_type", None) == "draft":
        return True
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return False
    draft = getattr(spec, "draft_model_config", None)
    return model_config is draft and draft is not getattr(spec, "target_model_config", None)


def default_load_config(load_config):
    """The same load config for vLLM's default loader: format ``auto``, no miprun options."""
    return dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})


def load_draft_unpruned(load_config, vllm_config, model_config, prefix: str = ""):
    """Load a draft model with vLLM's ``DefaultModelLoader``, every block kept."""
    logger.info("miprun: %s is a speculative-decoding draft; loading it unpruned with the default loader",
                model_config.model)
    if reads_no_block(model_config):
        # vLLM builds an MTP draft from ``vllm_config.model_config``, the target's config: pruned
        # here, it has neither the full depth (the MTP layers' index) nor the MTP layers. The
        # draft's own config is the checkpoint's, what the unpruned target's would be.
        vllm_config = copy.copy(vllm_config)
        vllm_config.model_config = model_config
    return draft_loader(load_config, model_config).load_model(vllm_config, model_config, prefix)


def reads_no_block(model_config) -> bool:
    """Whether a draft reads no block of the target's stack (an MTP draft of its checkpoint)."""
    return getattr(model_config.hf_config, "model_type", None) in STACK_FREE_DRAFTS


def draft_loader(load_config, model_config):
    """vLLM's ``DefaultModelLoader`` for a draft. An MTP draft of the target's own checkpoint
    reads no block of its stack: it is given the shards it reads by name, so the shards
    holding only (pruned) blocks are not downloaded."""
    default = default_load_config(load_config)
    if reads_no_block(model_config):
        shards = model_files.fetch_outside_stack(model_files.ModelSource.from_configs(model_config, default))
        if shards is not None:
            logger.info("miprun: the %s draft reads only the tensors outside the decoder stack: shards %s",
                        model_config.hf_config.model_type, [path.name for path in shards])
            return named_shards_loader(default, shards)
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    return DefaultModelLoader(default)


def named_shards_loader(load_config, shards: list[Path]):
    """vLLM's ``DefaultModelLoader`` reading exactly ``shards`` (fetched already) and no other
    file. Its ``allow_patterns_overrides`` cannot say this: it keeps the first pattern that
    matches anything."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class NamedShardsLoader(DefaultModelLoader):
        def _prepare_weights(self, model_name_or_path, subfolder, revision, fall_back_to_pt,
                             allow_patterns_overrides):
            return str(shards[0].parent), [str(path) for path in shards], True, INDEX_NAME

    return NamedShardsLoader(load_config)


def lora_renumbering(kept: list[int]) -> dict[re.Pattern, str]:
    """Regex renames ``model.layers.{kept[j]}.`` -> ``model.layers.{j}.``, in ascending order
    so a renamed key is never matched again (``j <= kept[j]`` < every later source index)."""
    escaped = re.escape(BLOCK_PREFIX)
    return {
        re.compile(rf"(^|\.){escaped}{old}\."): rf"\g<1>{BLOCK_PREFIX}{new}."
        for new, old in enumerate(sorted(kept)) if new != old
    }


def lora_skips(kept: list[int], num_blocks: int) -> list[str]:
    """Weight-name prefixes of the pruned blocks (vLLM skips ``.prefix`` anywhere in a name)."""
    wanted = set(kept)
    return [f"{BLOCK_PREFIX}{index}." for index in range(num_blocks) if index not in wanted]


def lora_only_renumbering(existing, kept: list[int]):
    """A ``hf_to_vllm_mapper`` that maps weights exactly like ``existing`` (the model's own,
    or none), while the renames LoRA asks for (``get_rename_mapper``) also renumber.

    Gemma 2/3, Cohere2 and many more pass ``self.hf_to_vllm_mapper`` to their own
    ``load_weights``: a plain merged mapper would renumber the (already renumbered) kept
    blocks a second time on every later load (reload, weight push)."""
    from vllm.model_executor.models.utils import WeightsMapper

    renumber = WeightsMapper(orig_to_new_regex=lora_renumbering(kept))
    base = existing if existing is not None else WeightsMapper()
    lora_renames = renumber | base.get_rename_mapper()

    class LoraRenumberingMapper(WeightsMapper):
        def get_rename_mapper(self) -> WeightsMapper:
            return lora_renames

    fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(WeightsMapper)}
    return LoraRenumberingMapper(**fields)


def route_lora_to_kept_blocks(model, kept: list[int], num_blocks: int) -> None:
    """Make vLLM's LoRA loading renumber adapters to the kept blocks and drop pruned ones."""
    model.hf_to_vllm_mapper = lora_only_renumbering(getattr(model, "hf_to_vllm_mapper", None), kept)
    skips = lora_skips(kept, num_blocks)
    model.lora_skip_prefixes = list(getattr(model, "lora_skip_prefixes", None) or []) + skips
    pruned = [index for index in range(num_blocks) if index not in set(kept)]
    logger.info(
        "miprun: LoRA adapters are renumbered to the kept blocks (block %s of the full model is "
        "block %s here); adapter weights for the pruned blocks %s are dropped",
        sorted(kept), list(range(len(kept))), pruned,
    )


def eagle3_depths(kept: list[int], num_blocks: int, layers) -> tuple[int, ...]:
    """The pruned model's depth for each full-model depth an EAGLE-3 draft reads."""
    layers = tuple(int(t) for t in layers)
    depths = tuple(sum(1 for block in kept if block < t) for t in layers)
    if len(set(depths)) < len(set(layers)):
        pruned = [i for i in range(num_blocks) if i not in set(kept)]
        raise OptionError(
            f"the speculative draft (EAGLE-3, DFlash, DSpark) reads the target's hidden states after blocks "
            f"{list(layers)} of the full model, but with blocks {pruned} pruned some of them are the same "
            f"state (depths {list(depths)}); prune fewer blocks between them, or serve without this draft"
        )
    return depths


def full_model_default_depths(num_blocks: int) -> tuple[int, int, int]:
    """vLLM's default EAGLE-3 depths, ``(2, L // 2, L - 3)``, of the full model's L blocks."""
    return 2, num_blocks // 2, num_blocks - 3


# The drafts vLLM 0.32 and 0.33 make the target output hidden states for (the model runner's
# list); 0.34 asks each method's config (``uses_aux_hidden_states``).
HIDDEN_STATE_METHODS = ("eagle3", "dflash", "dspark", "extract_hidden_states")


def draft_reads_hidden_states(speculative_config) -> bool:
    if hasattr(type(speculative_config), "uses_aux_hidden_states"):
        return bool(speculative_config.uses_aux_hidden_states)
    return getattr(speculative_config, "method", None) in HIDDEN_STATE_METHODS


def check_draft_depths(vllm_config) -> None:
    """Refuse, in the front process and before any engine starts, a draft whose hidden-state
    depths the plan merges. The worker's setter (below) refuses the same, but only once the
    weights are loaded; vLLM's own reading of the draft's config names the depths here."""
    speculative_config = getattr(vllm_config, "speculative_config", None)
    hf_config = vllm_config.model_config.hf_config
    kept = getattr(hf_config, KEPT_FIELD, None)
    if speculative_config is None or kept is None or not draft_reads_hidden_states(speculative_config):
        return
    from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config

    num_blocks = int(getattr(hf_config, FULL_FIELD))
    layers = get_eagle3_aux_layers_from_config(speculative_config) or full_model_default_depths(num_blocks)
    eagle3_depths(list(kept), num_blocks, layers)


def route_eagle3_to_kept_blocks(model, kept: list[int], num_blocks: int) -> None:
    """Make the target's EAGLE-3 aux-layer setter take full-model depths (see the module doc)."""
    if not hasattr(model, "set_aux_hidden_state_layers"):
        return
    set_pruned_depths = model.set_aux_hidden_state_layers

    def set_full_model_depths(layers) -> None:
        depths = eagle3_depths(kept, num_blocks, layers)
        logger.info("miprun: the draft's hidden states after blocks %s of the full model are read at depths %s "
                    "of the pruned one", list(layers), list(depths))
        set_pruned_depths(depths)

    model.set_aux_hidden_state_layers = set_full_model_depths
    model.get_eagle3_default_aux_hidden_state_layers = lambda: full_model_default_depths(num_blocks)
