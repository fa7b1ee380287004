"""The ``miprun`` model loader: build only the kept blocks and read only their weights.

The plan is normally made once in the front process (see ``engine_args``), which
writes the kept indices into the HF config through vLLM's ``hf_overrides``. Every
process then sees a model with K blocks: vLLM builds K decoder layers, registers K
attention layers (so KV cache is sized for K), and hashes a config that records
``miprun_kept_layers``, so no cache can confuse it with the full model. This loader
only has to feed the kept blocks' tensors, renumbered, to the model's own
``load_weights`` (which does dtype casts and tensor-parallel sharding).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

from vllm_miprun.model import architectures, checkpoint, remap, weights
from vllm_miprun.pipeline import heal
from vllm_miprun.pipeline.plan import DIGEST_FIELD, DIGEST_SOURCE_FIELD, check_digest, digest_fields
from vllm_miprun.options import MiprunOptions, OptionError
from vllm_miprun.vllm import full_model_weights, lora_and_draft, model_files, worker_paths
from vllm_miprun.vllm.compat import check_vllm_supported, init_ep_weight_filter
from vllm_miprun.vllm.kv_layout import kv_layouts
from vllm_miprun.vllm.kv_transfer import cover_plan_in_nixl_hash
from vllm_miprun.vllm.ranks import check_ranks_agree
from vllm_miprun.vllm.model_files import ModelSource

# Under "vllm." so vLLM's logging config (handler, level, format) applies to it.
logger = init_logger(f"vllm.{__name__}")

LOAD_FORMAT = "miprun"

_report_lock = threading.Lock()
_last_report: dict[str, Any] | None = None


def last_load_report() -> dict[str, Any] | None:
    """The plan and timings of the last plan or load in this process (a copy)."""
    with _report_lock:
        return dict(_last_report) if _last_report is not None else None


def record_report(report: dict[str, Any], run_dir: Path | None = None) -> None:
    """Keep ``report`` for ``last_load_report`` and hand it to the metrics module
    (``run_dir``: the report folder named in a worker's config)."""
    global _last_report
    with _report_lock:
        _last_report = {**(_last_report or {}), **report}
        merged = dict(_last_report)
    try:
        from vllm_miprun.vllm import metrics
    except ImportError:
        return
    metrics.publish(merged, run_dir)


def make_plan_for(model_dir: Path, options: MiprunOptions, hf_config: dict[str, Any]):
    """Check the architecture first (cheap), then make the plan."""
    from vllm_miprun.pipeline.plan import make_plan

    remap.check_architecture(hf_config)
    return make_plan(model_dir, options, hf_config=hf_config)


def plan_report(plan, plan_seconds: float) -> dict[str, Any]:
    return {**plan.to_json(), "kept": list(plan.kept), "pruned": list(plan.pruned),
            "plan_seconds": round(plan_seconds, 3)}


def _apply_overrides_in_place(model_config: ModelConfig, overrides: dict[str, Any]) -> None:
    """Patch a config that reached the worker unpruned (no front-process plan)."""
    for key, value in overrides.items():
        setattr(model_config.hf_config, key, value)
        if model_config.hf_text_config is not model_config.hf_config:
            setattr(model_config.hf_text_config, key, value)
    model_config.model_arch_config = model_config.get_model_arch_config()


def check_config_digest(hf_config) -> str | None:
    """The plan digest this config carries, checked against its kept blocks."""
    digest = getattr(hf_config, DIGEST_FIELD, None)
    check_digest(hf_config.miprun_kept_layers, int(hf_config.miprun_num_blocks_full), digest,
                 getattr(hf_config, DIGEST_SOURCE_FIELD, None))
    return digest


@register_model_loader(LOAD_FORMAT)
class MiprunModelLoader(BaseModelLoader):
    """Loads a model with only the blocks the MI-PRUN plan keeps."""

    def __init__(self, load_config: LoadConfig):
        check_vllm_supported()  # also where no front process planned (Ray workers get VLLM_*)
        super().__init__(load_config)
        self.options = MiprunOptions.from_dict(load_config.model_loader_extra_config)
        self.run_dir = worker_paths.carried_run_dir(load_config.model_loader_extra_config)
        self._read_bytes = 0
        self._skipped_bytes = 0
        # built in the worker after its KV connector: a prefill/decode peer serving another
        # plan is then refused by NIXL's handshake
        cover_plan_in_nixl_hash()

    def _source(self, model_config: ModelConfig) -> ModelSource:
        return ModelSource.from_configs(model_config, self.load_config)

    def download_model(self, model_config: ModelConfig) -> None:
        source = self._source(model_config)
        kept = getattr(model_config.hf_config, remap.KEPT_FIELD, None)
        if kept is None:  # not planned yet: the plan decides which shards
            model_files.fetch_for_plan(source, self.options)
            return
        model_files.fetch_kept_shards(source, model_files.fetch_metadata(source), list(kept))

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        if lora_and_draft.is_draft(vllm_config, model_config):
            return lora_and_draft.load_draft_unpruned(self.load_config, vllm_config, model_config, prefix)
        start = time.perf_counter()
        self._ensure_pruned_config(model_config, vllm_config)
        digest = check_config_digest(model_config.hf_config)
        check_ranks_agree(model_config.hf_config.miprun_kept_layers, digest)
        model = super().load_model(vllm_config, model_config, prefix)
        kept = list(model_config.hf_config.miprun_kept_layers)
        full = int(model_config.hf_config.miprun_num_blocks_full)
        if vllm_config.lora_config is not None:
            lora_and_draft.route_lora_to_kept_blocks(model, kept, full)
        lora_and_draft.route_eagle3_to_kept_blocks(model, kept, full)
        report = {
            "kept": kept,
            "pruned": [i for i in range(full) if i not in set(kept)],
            "num_blocks": full,
            "load_seconds": round(time.perf_counter() - start, 3),
            "read_bytes": self._read_bytes,
            "skipped_bytes": self._skipped_bytes,
            "kv_layouts": kv_layouts(vllm_config, lambda: checkpoint.read_config(
                model_files.resolve_model_dir(self._source(model_config))), kept, full),
        }
        logger.info(
            "miprun: built %d of %d blocks, kept %s, pruned %s, read %.1f MiB, "
            "skipped %.1f MiB, load %.2f s",
            len(kept), full, kept, report["pruned"], self._read_bytes / 2**20,
            self._skipped_bytes / 2**20, report["load_seconds"],
        )
        record_report(report, self.run_dir)
        return model

    def _ensure_pruned_config(self, model_config: ModelConfig, vllm_config: VllmConfig | None = None) -> None:
        """Normally a no-op; plans here only when the front process did not. Then the
        quantization config vLLM built from the full checkpoint is built again from the
        renumbered one, and ranks that planned alone must agree."""
        if getattr(model_config.hf_config, remap.KEPT_FIELD, None) is not None:
            return
        planned = model_files.plan_source(
            self._source(model_config), self.options,
            lambda folder, hf_config: make_plan_for(folder, self.options, hf_config))
        kept = planned.plan.kept
        logger.warning(
            "miprun: planning in the worker because the engine config was not made by "
            "EngineArgs; kept %s", list(kept),
        )
        _apply_overrides_in_place(model_config, {**remap.pruned_fields(planned.folder, planned.hf_config, kept),
                                                 **digest_fields(planned.plan)})
        if vllm_config is not None and model_config.quantization is not None:
            # Built from the full model's quantization_config: its ignore lists and dynamic
            # rules name full-model block numbers.
            vllm_config.quant_config = VllmConfig.get_quantization_config(model_config, self.load_config)
        record_report(plan_report(planned.plan, planned.plan_seconds), self.run_dir)

    def _kept_files(self, model_config: ModelConfig, kept: list[int]) -> tuple[Path, list[Path]]:
        """(checkpoint folder, shards holding kept tensors); counts the bytes read and skipped."""
        source = self._source(model_config)
        model_dir = model_files.fetch_kept_shards(source, model_files.fetch_metadata(source), kept)
        files, self._read_bytes, self._skipped_bytes = model_files.plan_kept_reads(model_dir, kept)
        return model_dir, files

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Iterator[tuple[str, Any]]:
        """The kept blocks' tensors and the non-block ones, under the checkpoint's (full-model)
        names; vLLM's ``reload_weights`` feeds them to ``model.load_weights``."""
        kept = list(model_config.hf_config.miprun_kept_layers)
        _, files = self._kept_files(model_config, kept)
        yield from self._kept_weights(model, model_config, files, kept)

    def _kept_weights(self, model: nn.Module, model_config: ModelConfig, files: list[Path], kept: list[int]):
        """The kept tensors under full-model names; with vLLM's expert-parallel weight filter
        (``--enable-ep-weight-filter``) other ranks' experts are skipped before they are read."""
        self.local_expert_ids = None
        init_ep_weight_filter(self, model, model_config)  # sets it only when asked for
        local = self.local_expert_ids
        skip = None if local is None else (lambda name: should_skip_weight(name, local))
        return weights.iter_kept_weights(files, kept, renumber=False, skip=skip)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        kept = list(model_config.hf_config.miprun_kept_layers)
        full = int(model_config.hf_config.miprun_num_blocks_full)
        model_dir, files = self._kept_files(model_config, kept)
        maps = heal.prepare_maps(model_dir, self.options, kept, full)  # {} unless heal=linear
        site = architectures.for_config(checkpoint.read_config(model_dir)).heal_site  # where maps fold
        full_model_weights.take_full_model_names(model, kept, full, maps, site)
        loaded = model.load_weights(self._kept_weights(model, model_config, files, kept))
        if loaded is not None and model_config.quantization is None:
            # vLLM's own completeness check: every parameter came from the checkpoint.
            DefaultModelLoader.track_weights_loading(self, model, loaded)
