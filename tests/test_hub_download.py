"""Hub ids: fetched through vLLM's download path, only the shards the kept blocks need.

The hub's network calls are replaced by ``fake_hub.FakeHub`` (the one allowed mock); the
rest (vLLM's ``download_weights_from_hf``, the lock, the cache layout, offline lookups)
is the real code.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
from vllm.engine.arg_utils import EngineArgs

from fake_hub import REPO_ID, FakeHub, expected_shards, write_sharded_repo
from vllm_miprun.errors import CacheError, ModelFolderError
from vllm_miprun.model import remap
from vllm_miprun.options import MiprunOptions
from vllm_miprun.vllm import model_files
from vllm_miprun.vllm.engine_args import prepare_engine_args

IGNORE = ["original/**/*"]


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_llama_dir):
    weight_map = write_sharded_repo(tiny_llama_dir, tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MIPRUN_CACHE_DIR", str(tmp_path / "scores"))
    fake = FakeHub(tmp_path / "remote", default_cache=tmp_path / "hf-default").install(monkeypatch)
    fake.weight_map = weight_map
    fake.download_dir = str(tmp_path / "downloads")
    return fake


def _engine_args(hub, **extra) -> EngineArgs:
    return EngineArgs(model=REPO_ID, load_format="miprun", revision="v1", download_dir=hub.download_dir,
                      ignore_patterns=list(IGNORE), model_loader_extra_config=extra)


@pytest.mark.parametrize("target", [{"keep": 0.5, "method": "last"}, {"drop": [3, 4, 5, 6]}],
                         ids=["method-last", "drop-list"])
def test_score_free_plan_downloads_only_the_kept_blocks_shards(hub, target):
    """A drop list needs no scores whatever the method: no shard of a dropped block is fetched."""
    args = _engine_args(hub, **target)
    prepare_engine_args(args)

    kept = args.hf_overrides[remap.KEPT_FIELD]
    assert kept == [0, 1, 2, 7]
    wanted = expected_shards(hub.weight_map, kept)
    all_shards = sorted(set(hub.weight_map.values()))
    assert len(wanted) < len(all_shards), "the plan must leave at least one shard unneeded"
    assert hub.downloads() == [model_files.METADATA_PATTERNS, wanted]  # no download of every shard first
    for call in hub.calls:  # every call carries the engine's revision, folder and ignore patterns
        assert (call["revision"], call["cache_dir"], call["ignore_patterns"]) == ("v1", hub.download_dir, IGNORE)
    folder = hub.snapshot_folder(hub.download_dir, "v1")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == wanted


def test_plan_that_needs_scores_downloads_every_shard_first(hub):
    args = _engine_args(hub, keep=0.5, method="shortgpt", require_cache=True)
    with pytest.raises(CacheError, match="require_cache"):
        prepare_engine_args(args)
    # vLLM's download_weights_from_hf: lists the repo, reads the index, fetches its shards
    assert [c["call"] for c in hub.calls] == ["snapshot_download", "ls", "hf_hub_download", "snapshot_download"]
    assert hub.calls[2]["filename"] == "model.safetensors.index.json"
    assert sorted(hub.downloads()[1]) == sorted(set(hub.weight_map.values()))
    for call in hub.calls[0], hub.calls[3]:  # the full download too keeps the engine's settings
        assert (call["revision"], call["ignore_patterns"]) == ("v1", IGNORE)


def test_heal_downloads_every_shard_even_for_a_score_free_plan(hub):
    """heal=linear fits on every block's calibration states, pruned blocks included."""
    prepare_engine_args(_engine_args(hub, keep=0.5, method="last", heal="linear", samples=4, seq_len=32))
    folder = hub.snapshot_folder(hub.download_dir, "v1")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(set(hub.weight_map.values()))


def test_a_damaged_shard_fetched_from_the_hub_is_refused_before_the_engine(hub):
    wanted = expected_shards(hub.weight_map, [0, 1, 2, 7])
    shard = hub.repo / wanted[-1]  # a kept block's shard: fetched after the plan
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(ModelFolderError, match=wanted[-1]):
        prepare_engine_args(_engine_args(hub, keep=0.5, method="last"))


def test_ignore_patterns_given_as_one_string_stay_one_pattern():
    """``LLM(ignore_patterns="original/**/*")``: one pattern, not one per character."""
    from types import SimpleNamespace

    args = SimpleNamespace(model=REPO_ID, revision=None, download_dir=None, ignore_patterns="original/**/*")
    assert model_files.ModelSource.from_engine_args(args).ignore_patterns == ("original/**/*",)


def test_offline_reads_the_cache_and_names_a_missing_shard(hub, monkeypatch):
    """Offline, vLLM's EngineArgs swaps the id for the cached snapshot folder (HF's default
    cache); the same plan then needs nothing new, and a larger one names the shard it lacks."""
    prepare_engine_args(_engine_args(hub, keep=0.5, method="last"))
    fetched = len(hub.calls)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub.download_dir)

    again = _engine_args(hub, keep=0.5, method="last")
    assert again.model == str(hub.snapshot_folder(hub.download_dir, "v1"))
    prepare_engine_args(again)
    assert again.hf_overrides[remap.KEPT_FIELD] is not None
    new_calls = hub.calls[fetched:]
    assert new_calls and all(call["local_files_only"] for call in new_calls)

    with pytest.raises(ModelFolderError, match=r"lacks the shards \['model-000") as info:
        prepare_engine_args(_engine_args(hub, keep=1.0, method="last"))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFolderError, match=r"needs scores.*every shard"):
        prepare_engine_args(_engine_args(hub, keep=0.5, method="shortgpt"))


def test_offline_hub_id_not_in_cache_is_one_line(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = model_files.ModelSource(REPO_ID, "v1", hub.download_dir, tuple(IGNORE))
    with pytest.raises(ModelFolderError, match="HF_HUB_OFFLINE is set") as info:
        model_files.fetch_for_plan(source, MiprunOptions(keep=0.5, method="last"))
    assert "\n" not in str(info.value) and REPO_ID in str(info.value)
    assert all(call["local_files_only"] for call in hub.calls)


def test_ignore_patterns_that_hide_a_needed_shard_are_named(hub):
    args = _engine_args(hub, keep=0.5, method="last")
    args.ignore_patterns = ["model-00001-*"]
    with pytest.raises(ModelFolderError, match=r"model-00001-of-.*--ignore-patterns"):
        prepare_engine_args(args)


def test_worker_finds_the_front_process_folder(hub, monkeypatch):
    from vllm.config.load import LoadConfig

    args = _engine_args(hub, keep=0.5, method="last")
    prepare_engine_args(args)
    kept = args.hf_overrides[remap.KEPT_FIELD]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    class WorkerModelConfig:  # what the worker's loader reads from vLLM's ModelConfig
        model, revision = REPO_ID, "v1"

    load_config = LoadConfig(load_format="miprun", download_dir=hub.download_dir, ignore_patterns=list(IGNORE))
    source = model_files.ModelSource.from_configs(WorkerModelConfig, load_config)
    folder = model_files.fetch_kept_shards(source, model_files.fetch_metadata(source), kept)
    assert folder == hub.snapshot_folder(hub.download_dir, "v1")
    needed, never = model_files.shard_split(folder, kept)
    assert needed == expected_shards(hub.weight_map, kept) and never
    total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert model_files.index_total_bytes(folder) == total
    _, read, skipped = model_files.plan_kept_reads(folder, kept)  # the never-fetched shards count as skipped
    assert read + skipped == total and 0 < read < total


def test_local_folder_is_never_fetched(hub, tiny_llama_dir, monkeypatch):
    from vllm_miprun.pipeline.hub_alias import MissingWeightsError

    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun",
                      model_loader_extra_config={"keep": 0.5, "method": "last"})
    prepare_engine_args(args)
    assert hub.calls == []

    # a plan that turns out to need weights the folder lacks: the error stands, nothing is fetched
    monkeypatch.setattr(model_files, "fetch_all_weights", lambda source: pytest.fail("fetched a local folder"))

    def plan_for(folder):
        raise MissingWeightsError("needs block 3")

    with pytest.raises(MissingWeightsError, match="needs block 3"):
        model_files.plan_or_fetch_all(model_files.ModelSource(str(tiny_llama_dir)), tiny_llama_dir, plan_for)



def test_plan_source_times_the_plan_and_applies_flat_overrides(tiny_llama_dir):
    """The front process and a planning worker share plan_source: the config the plan sees
    carries the engine's flat hf_overrides (nested ones are vLLM's), and plan_seconds is the
    time spent planning."""
    import time
    from types import SimpleNamespace

    seen = {}

    def plan_for(folder, hf_config):
        seen.update(folder=folder, config=dict(hf_config))
        time.sleep(0.05)
        return SimpleNamespace(kept=[0, 1])

    source = model_files.ModelSource(str(tiny_llama_dir))
    planned = model_files.plan_source(source, MiprunOptions(keep=0.5, method="last"), plan_for,
                                      {"rope_theta": 123.0, "rope_scaling": {"type": "linear"}})
    assert planned.folder == tiny_llama_dir == seen["folder"]
    assert seen["config"]["rope_theta"] == 123.0 and "rope_scaling" not in seen["config"]
    assert planned.plan.kept == [0, 1] and 0.05 <= planned.plan_seconds < 5


def test_plan_seconds_count_both_plans_when_a_plan_needs_every_shard(hub):
    """A plan that turns out to need weights the snapshot lacks runs twice: both runs count."""
    import time
    from types import SimpleNamespace

    from vllm_miprun.pipeline.hub_alias import MissingWeightsError

    calls = []

    def plan_for(folder, hf_config):
        calls.append(folder)
        time.sleep(0.05)
        if len(calls) == 1:
            raise MissingWeightsError("needs block 3")
        return SimpleNamespace(kept=[0, 1, 2, 7])

    source = model_files.ModelSource(REPO_ID, "v1", hub.download_dir, tuple(IGNORE))
    planned = model_files.plan_source(source, MiprunOptions(keep=0.5, method="last"), plan_for)
    assert len(calls) == 2 and planned.plan.kept == [0, 1, 2, 7]
    assert 0.1 <= planned.plan_seconds < 10


@pytest.mark.parametrize("metadata, total", [
    ({"total_size": 1234}, 1234), ({"total_size": "1234"}, 1234),
    ({"total_size": 12.5}, None), ({"total_size": "12x"}, None), ({"total_size": -5}, None),
    ({"total_size": None}, None), ({}, None), (None, None),
])
def test_index_total_bytes_is_a_whole_byte_count_or_unknown(tmp_path, metadata, total):
    index = {"weight_map": {}} if metadata is None else {"metadata": metadata, "weight_map": {}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert model_files.index_total_bytes(tmp_path) == total
    assert model_files.index_total_bytes(tmp_path / "no-index") is None


def test_a_hub_error_is_named_by_its_first_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    source = model_files.ModelSource(REPO_ID, "v1")
    error = model_files._fetch_error(source, ["*.json"], OSError("  Cannot reach the hub.\nTraceback: details\n"))
    assert str(error) == (f"miprun could not fetch ['*.json'] of {REPO_ID!r} (revision v1) from the hub: "
                          "OSError: Cannot reach the hub.; expected a local folder or a hub id that is cached "
                          "or reachable")


def test_layers_past_the_stack_are_always_fetched(tmp_path, tiny_llama_dir):
    """DeepSeek-V3 keeps its multi-token-prediction layer at index num_hidden_layers. It is
    no block of the stack, so pruning never drops its shard: an MTP draft reads it."""
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    weight_map = {f"model.layers.{i}.mlp.down_proj.weight": f"model-0000{i + 1}-of-00005.safetensors"
                  for i in range(5)}
    weight_map["model.embed_tokens.weight"] = "model-00001-of-00005.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    needed, never = model_files.shard_split(tmp_path, [0, 1])
    assert needed == ["model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
                      "model-00005-of-00005.safetensors"]
    assert never == ["model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors"]
    # one file holds the stack and what is outside it: an MTP draft reads it whole
    assert model_files.fetch_outside_stack(model_files.ModelSource(str(tiny_llama_dir))) is None


def _with_a_layer_past_the_stack(hub) -> tuple[str, list[str]]:
    """Make the hub's last block a layer past the stack (an MTP layer: DeepSeek-V3 keeps it at
    index num_hidden_layers). Returns its weight-name prefix and the shards holding any tensor
    outside the stack, by the test's own count."""
    config = json.loads((hub.repo / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (hub.repo / "config.json").write_text(json.dumps(config))
    past = f"model.layers.{config['num_hidden_layers']}."
    outside = sorted({shard for name, shard in hub.weight_map.items()
                      if not name.startswith("model.layers.") or name.startswith(past)})
    return past, outside


def test_mtp_draft_of_the_same_repo_downloads_only_the_shards_outside_the_stack(hub):
    """A DeepSeek MTP draft reads the layers past the stack and the embedding. Through vLLM's
    own ``get_all_weights``, it gets every tensor of the shards holding them, and the shards
    of blocks only are never downloaded (vLLM's default loader fetches every shard)."""
    from types import SimpleNamespace

    import torch
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from vllm_miprun.vllm import lora_and_draft

    past, outside = _with_a_layer_past_the_stack(hub)
    assert len(outside) < len(set(hub.weight_map.values())), "some shard must hold blocks only"
    load_config = LoadConfig(load_format="miprun", download_dir=hub.download_dir, ignore_patterns=list(IGNORE),
                             model_loader_extra_config={"keep": 0.5})
    model_config = SimpleNamespace(model=REPO_ID, revision="v1", hf_config=SimpleNamespace(model_type="deepseek_mtp"))

    loader = lora_and_draft.draft_loader(load_config, model_config)
    read = dict(loader.get_all_weights(model_config, torch.nn.Module()))
    assert set(read) == {name for name, shard in hub.weight_map.items() if shard in outside}
    assert any(name.startswith(past) for name in read) and "model.embed_tokens.weight" in read
    assert hub.downloads() == [model_files.METADATA_PATTERNS, outside]
    folder = hub.snapshot_folder(hub.download_dir, "v1")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == outside

    llama_draft = SimpleNamespace(model=REPO_ID, revision="v1", hf_config=SimpleNamespace(model_type="llama"))
    assert type(lora_and_draft.draft_loader(load_config, llama_draft)) is DefaultModelLoader  # reads every block

    # what vLLM's default loader does with the same draft: it fetches every shard ("auto" would
    # first list the repo's files through an API call the fake hub does not answer)
    stock = LoadConfig(load_format="safetensors", download_dir=hub.download_dir, ignore_patterns=list(IGNORE))
    dict(DefaultModelLoader(stock).get_all_weights(model_config, torch.nn.Module()))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(set(hub.weight_map.values()))


def test_metrics_read_the_snapshot_in_the_engines_download_folder(hub, monkeypatch):
    """The API server's metrics exporter finds the same snapshot as the loader: in
    ``--download-dir``, not in the hub's default cache."""
    from types import SimpleNamespace

    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm.metrics import exporter_for

    args = _engine_args(hub, keep=0.5, method="last")
    prepare_engine_args(args)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    kept = args.hf_overrides[remap.KEPT_FIELD]
    hf_config = SimpleNamespace(**{remap.KEPT_FIELD: kept, remap.FULL_FIELD: 8, "miprun_plan_digest": "0123456789ab"})
    model_config = SimpleNamespace(model=REPO_ID, revision="v1", hf_config=hf_config, served_model_name=REPO_ID,
                                   dtype="float32")
    load_config = LoadConfig(load_format="miprun", download_dir=hub.download_dir, ignore_patterns=list(IGNORE),
                             model_loader_extra_config={})
    from vllm.config import CacheConfig, ParallelConfig

    vllm_config = SimpleNamespace(model_config=model_config, load_config=load_config,
                                  cache_config=CacheConfig(cache_dtype="auto"), parallel_config=ParallelConfig())
    exporter = exporter_for(vllm_config)
    assert exporter.model_dir == hub.snapshot_folder(hub.download_dir, "v1")
    assert exporter.kept == list(kept) and exporter.num_blocks == 8
    assert exporter.digest == "0123456789ab"  # the miprun_plan_info gauge's label


def test_worker_download_of_a_planned_config_fetches_only_the_kept_blocks_shards(hub):
    """vLLM asks the loader to download before loading: a config that already carries the plan
    (the front process planned) gets the metadata and the kept blocks' shards, nothing else."""
    from types import SimpleNamespace

    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm.loader import MiprunModelLoader

    kept = [0, 1, 2, 3]
    wanted = expected_shards(hub.weight_map, kept)
    assert 0 < len(wanted) < len(set(hub.weight_map.values()))
    load_config = LoadConfig(load_format="miprun", download_dir=hub.download_dir, ignore_patterns=list(IGNORE),
                             model_loader_extra_config={"keep": 0.5, "method": "last"})
    hf_config = SimpleNamespace(**{remap.KEPT_FIELD: kept, remap.FULL_FIELD: 8})
    model_config = SimpleNamespace(model=REPO_ID, revision="v1", hf_config=hf_config)
    MiprunModelLoader(load_config).download_model(model_config)
    metadata, shards = hub.downloads()
    assert metadata == model_files.METADATA_PATTERNS and shards == wanted
