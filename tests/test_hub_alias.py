"""Hub aliases: a hub id planned from cached scores fetches only the kept blocks' shards.

The first plan of a commit downloads every shard, scores them and records the alias
(commit -> fingerprint) beside the score caches; a later plan of the same commit (a new
replica: its own download folder, the same cache folder) asks the hub for the metadata
and the kept blocks' shards only. The hub's network calls are replaced by
``fake_hub.FakeHub`` (the one allowed mock); everything else is the real code.
"""

from __future__ import annotations

import json
import logging
import shutil

import huggingface_hub.constants
import pytest
from vllm.engine.arg_utils import EngineArgs

from fake_hub import REPO_ID, FakeHub, expected_shards, write_sharded_repo
from vllm_miprun.errors import CacheError, ModelFolderError
from vllm_miprun.model import remap
from vllm_miprun.model.fingerprint import model_fingerprint
from vllm_miprun.pipeline import hub_alias
from vllm_miprun.vllm import model_files
from vllm_miprun.vllm.engine_args import prepare_engine_args
from vllm_miprun.vllm.loader import last_load_report

# One block per shard, so every pruned block leaves a shard that is never needed.
MI_PRUN = {"keep": 0.5, "method": "mi-prun", "samples": 4, "seq_len": 32, "device": "cpu"}
COMMIT_A = "a" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_llama_dir):
    weight_map = write_sharded_repo(tiny_llama_dir, tmp_path / "remote", blocks_per_shard=1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MIPRUN_CACHE_DIR", str(tmp_path / "scores"))
    fake = FakeHub(tmp_path / "remote", default_cache=tmp_path / "hf-default").install(monkeypatch)
    fake.weight_map, fake.scores, fake.root = weight_map, tmp_path / "scores", tmp_path
    return fake


def _plan(hub, replica: str, revision: str = "v1", **extra) -> tuple[EngineArgs, list[dict]]:
    """Plan as `vllm serve org/tiny` would on a replica with its own download folder."""
    start = len(hub.calls)
    args = EngineArgs(model=REPO_ID, load_format="miprun", revision=revision,
                      download_dir=str(hub.root / replica), model_loader_extra_config={**MI_PRUN, **extra})
    prepare_engine_args(args)
    return args, hub.calls[start:]


def _every_shard(hub) -> list[str]:
    return sorted(set(hub.weight_map.values()))


def _shards_on_disk(hub, replica: str, revision: str = "v1") -> list[str]:
    return sorted(p.name for p in hub.snapshot_folder(str(hub.root / replica), revision).glob("*.safetensors"))


def _downloads(calls) -> list[list[str]]:
    return [c["allow_patterns"] for c in calls if c["call"] == "snapshot_download"]


@pytest.fixture
def first(hub):
    """Replica A: downloads every shard, calibrates, runs the mi-prun search, records the alias."""
    args, calls = _plan(hub, "replica-a")
    assert [c["call"] for c in calls] == ["snapshot_download", "ls", "hf_hub_download", "snapshot_download",
                                          "snapshot_download"]
    assert sorted(_downloads(calls)[1]) == _every_shard(hub)
    assert last_load_report()["scores_source"] == "computed"
    aliases = list(hub.scores.glob("hub-*.alias.json"))
    assert len(aliases) == 1
    record = json.loads(aliases[0].read_text())
    folder = hub.snapshot_folder(str(hub.root / "replica-a"), "v1")
    assert (record["repo_id"], record["commit"]) == (REPO_ID, hub.commit("v1"))
    assert record["fingerprint"] == model_fingerprint(folder)
    return args


def test_second_replica_fetches_only_the_kept_blocks_shards(hub, first):
    kept = first.hf_overrides[remap.KEPT_FIELD]
    args, calls = _plan(hub, "replica-b")

    assert args.hf_overrides[remap.KEPT_FIELD] == kept  # the partial snapshot plans as the full one
    assert [c["call"] for c in calls] == ["snapshot_download", "snapshot_download"]  # no listing, no index
    wanted = expected_shards(hub.weight_map, kept)
    assert _downloads(calls) == [model_files.METADATA_PATTERNS, wanted]
    assert len(wanted) < len(_every_shard(hub))
    assert _shards_on_disk(hub, "replica-b") == wanted  # a pruned-only shard never reached the disk
    report = last_load_report()
    assert report["scores_source"] == "cache-hit" and report["fingerprint"] == json.loads(
        next(hub.scores.glob("hub-*.alias.json")).read_text())["fingerprint"]


def test_explicit_score_file_works_on_a_partial_snapshot(hub, first):
    score_file = last_load_report()["cache_path"]
    args, calls = _plan(hub, "replica-b", scores=score_file)
    assert args.hf_overrides[remap.KEPT_FIELD] == first.hf_overrides[remap.KEPT_FIELD]
    assert _downloads(calls)[1] == expected_shards(hub.weight_map, first.hf_overrides[remap.KEPT_FIELD])


def test_a_request_the_cache_has_not_answered_downloads_every_shard_and_plans_again(hub, first):
    """keep 0.75 was never searched: the partial plan needs the weights after all."""
    args, calls = _plan(hub, "replica-b", keep=0.75)
    downloads = _downloads(calls)
    assert downloads[0] == model_files.METADATA_PATTERNS
    assert sorted(downloads[1]) == _every_shard(hub)  # through download_weights_from_hf
    assert len(args.hf_overrides[remap.KEPT_FIELD]) == 6
    assert last_load_report()["scores_source"] == "cache-hit"


def test_another_revision_does_not_match_the_alias(hub, first):
    with pytest.raises(CacheError, match="require_cache"):
        _plan(hub, "replica-b", revision="v2", require_cache=True)
    assert _shards_on_disk(hub, "replica-b", "v2") == _every_shard(hub)


def test_corrupt_alias_is_ignored_and_rewritten(hub, first, caplog):
    alias = next(hub.scores.glob("hub-*.alias.json"))
    good = alias.read_text()
    alias.write_text(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        args, _ = _plan(hub, "replica-b")
    assert "ignoring hub alias" in caplog.text
    assert _shards_on_disk(hub, "replica-b") == _every_shard(hub)
    assert args.hf_overrides[remap.KEPT_FIELD] == first.hf_overrides[remap.KEPT_FIELD]
    assert json.loads(alias.read_text()) == json.loads(good)  # the full download wrote it again


def test_alias_pointing_at_another_models_scores_is_never_used(hub, first, tiny_qwen2_dir):
    """The alias's fingerprint edited to another model's, whose scores are cached: the plan
    never sees them; it downloads every shard and uses this model's own cache."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibrate

    other = calibrate(tiny_qwen2_dir, MiprunOptions.from_dict(MI_PRUN).calibration, cache_dir=hub.scores,
                      progress=False)
    alias = next(hub.scores.glob("hub-*.alias.json"))
    record = json.loads(alias.read_text())
    own = record["fingerprint"]
    alias.write_text(json.dumps({**record, "fingerprint": other.cache.fingerprint}))

    args, _ = _plan(hub, "replica-b")
    report = last_load_report()
    assert report["fingerprint"] == own != other.cache.fingerprint
    assert report["cache_path"] != str(other.path)
    assert _shards_on_disk(hub, "replica-b") == _every_shard(hub)


def test_worker_replans_on_a_partial_snapshot(hub, first, monkeypatch):
    """The worker's own plan (no front-process plan) reads the same partial folder offline."""
    import types

    from vllm.config.load import LoadConfig

    from vllm_miprun.vllm.loader import MiprunModelLoader

    _plan(hub, "replica-b")  # the front process of replica B fetched metadata + kept shards
    start = len(hub.calls)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hf_config = types.SimpleNamespace()
    model_config = types.SimpleNamespace(model=REPO_ID, revision="v1", hf_config=hf_config,
                                         hf_text_config=hf_config, get_model_arch_config=lambda: None)
    loader = MiprunModelLoader(LoadConfig(load_format="miprun", download_dir=str(hub.root / "replica-b"),
                                          model_loader_extra_config=dict(MI_PRUN)))
    loader._ensure_pruned_config(model_config)
    assert hf_config.miprun_kept_layers == first.hf_overrides[remap.KEPT_FIELD]
    assert all(call["local_files_only"] for call in hub.calls[start:])
    assert _shards_on_disk(hub, "replica-b") == expected_shards(hub.weight_map, hf_config.miprun_kept_layers)


# --- the alias file itself, on snapshot folders made by hand -----------------------------------


def _snapshot(root, tiny_model_dir, shards: bool, name: str = "models--org--tiny", commit: str = COMMIT_A,
              sharded: bool = True):
    """A hub snapshot folder made by hand: one block per shard, or (not ``sharded``) the single
    ``model.safetensors`` without an index; ``shards=False`` leaves out its weights."""
    folder = root / name / "snapshots" / commit
    if sharded:
        write_sharded_repo(tiny_model_dir, folder, blocks_per_shard=1)
    else:
        shutil.copytree(tiny_model_dir, folder)
    if not shards:
        for shard in folder.glob("*.safetensors"):
            shard.unlink()
    return folder


def test_snapshot_id_reads_the_hub_cache_layout(tmp_path):
    def folder(*parts):
        path = tmp_path.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    found = hub_alias.snapshot_id(folder("models--org--m", "snapshots", COMMIT_A))
    assert found == hub_alias.SnapshotId("org/m", COMMIT_A)
    assert hub_alias.snapshot_id(folder("models--gpt2", "snapshots", COMMIT_A)).repo_id == "gpt2"
    assert hub_alias.snapshot_id(folder("models--org--m", "snapshots", "main")) is None
    assert hub_alias.snapshot_id(folder("models--org--m", "snapshots", COMMIT_A + "-edited")) is None
    assert hub_alias.snapshot_id(folder("models--org--m", "checkpoints", COMMIT_A)) is None
    assert hub_alias.snapshot_id(folder("datasets--org--m", "snapshots", COMMIT_A)) is None
    assert hub_alias.snapshot_id(folder("org", "m")) is None


def test_alias_gives_a_partial_snapshot_its_fingerprint(tmp_path, tiny_llama_dir):
    full = _snapshot(tmp_path / "a", tiny_llama_dir, shards=True)
    partial = _snapshot(tmp_path / "b", tiny_llama_dir, shards=False)
    cache = tmp_path / "scores"
    with pytest.raises(hub_alias.MissingWeightsError, match="lacks the shards"):
        hub_alias.weights_fingerprint(partial, cache)
    fingerprint = hub_alias.weights_fingerprint(full, cache)  # records the alias
    assert hub_alias.weights_fingerprint(partial, cache) == fingerprint == model_fingerprint(full)
    assert hub_alias.known_fingerprint(partial, tmp_path / "elsewhere") is None  # another cache folder

    # a local folder that is not a hub snapshot never gets a fingerprint without its shards
    plain = tmp_path / "plain"
    shutil.copytree(partial, plain)
    with pytest.raises(ModelFolderError, match="lacks the shards"):
        hub_alias.weights_fingerprint(plain, cache)


def test_a_single_file_snapshot_without_its_weights_finds_them_by_its_alias(tmp_path, tiny_llama_dir):
    """No index: the missing shards are not named anywhere, and the folder is still partial."""
    full = _snapshot(tmp_path / "a", tiny_llama_dir, shards=True, sharded=False)
    partial = _snapshot(tmp_path / "b", tiny_llama_dir, shards=False, sharded=False)
    assert not (partial / "model.safetensors.index.json").exists()
    assert hub_alias.has_every_shard(full) and not hub_alias.has_every_shard(partial)
    cache = tmp_path / "scores"
    with pytest.raises(hub_alias.MissingWeightsError):
        hub_alias.weights_fingerprint(partial, cache)
    fingerprint = hub_alias.weights_fingerprint(full, cache)
    assert hub_alias.weights_fingerprint(partial, cache) == fingerprint


def test_two_commits_of_one_repo_keep_their_own_aliases(tmp_path, tiny_llama_dir, tiny_qwen2_dir):
    cache = tmp_path / "scores"
    commits = {"a" * 40: tiny_llama_dir, "b" * 40: tiny_qwen2_dir}
    fingerprints = {commit: hub_alias.weights_fingerprint(_snapshot(tmp_path / "full", model, shards=True,
                                                                    commit=commit), cache)
                    for commit, model in commits.items()}
    assert len(set(fingerprints.values())) == 2
    for commit, model in commits.items():
        partial = _snapshot(tmp_path / "partial", model, shards=False, commit=commit)
        assert hub_alias.known_fingerprint(partial, cache) == fingerprints[commit]


DEEPLY_NESTED = "[" * 100_000 + "]" * 100_000  # json raises RecursionError, not a ValueError


@pytest.mark.parametrize("tamper", ["other-fingerprint", "nan", "deeply-nested"])
def test_a_complete_snapshot_rewrites_a_stale_alias(tmp_path, tiny_llama_dir, tamper):
    """Else every partial replica of that commit downloads every shard, for good."""
    full = _snapshot(tmp_path / "a", tiny_llama_dir, shards=True)
    cache = tmp_path / "scores"
    fingerprint = hub_alias.weights_fingerprint(full, cache)
    path = hub_alias.alias_path(hub_alias.snapshot_id(full), cache)
    good = json.loads(path.read_text())
    if tamper == "nan":
        path.write_text(path.read_text().replace('"format_version": 1', '"format_version": NaN'))
    elif tamper == "deeply-nested":
        path.write_text(DEEPLY_NESTED)
    else:
        path.write_text(json.dumps({**good, "fingerprint": "sha256:" + "0" * 64}))
    assert hub_alias.weights_fingerprint(full, cache) == fingerprint
    assert json.loads(path.read_text()) == good


@pytest.mark.parametrize("tamper", ["truncated", "other-repo", "other-commit", "bad-fingerprint", "newer",
                                    "version-string", "version-null", "version-float", "version-true",
                                    "version-0", "config-differs",
                                    "index-differs", "nan", "deeply-nested"])
def test_a_bad_alias_is_ignored_with_a_warning(tmp_path, tiny_llama_dir, tamper, caplog):
    full = _snapshot(tmp_path / "a", tiny_llama_dir, shards=True)
    partial = _snapshot(tmp_path / "b", tiny_llama_dir, shards=False)
    cache = tmp_path / "scores"
    hub_alias.weights_fingerprint(full, cache)
    path = hub_alias.alias_path(hub_alias.snapshot_id(partial), cache)
    record = json.loads(path.read_text())
    if tamper == "truncated":
        path.write_text(path.read_text()[:40])
    elif tamper == "nan":
        path.write_text(path.read_text().replace('"format_version": 1', '"format_version": NaN'))
    elif tamper == "deeply-nested":
        path.write_text(DEEPLY_NESTED)
    else:
        changes = {"other-repo": {"repo_id": "org/other"}, "other-commit": {"commit": "b" * 40},
                   "bad-fingerprint": {"fingerprint": "sha256:xyz"}, "newer": {"format_version": 99},
                   "version-string": {"format_version": "1"}, "version-null": {"format_version": None},
                   "version-float": {"format_version": 1.0}, "version-true": {"format_version": True},
                   "version-0": {"format_version": 0}}
        path.write_text(json.dumps({**record, **changes.get(tamper, {})}))
    if tamper == "config-differs":  # the partial snapshot's config is not the one that was scored
        config = json.loads((partial / "config.json").read_text())
        (partial / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    if tamper == "index-differs":  # nor its safetensors index
        index = json.loads((partial / "model.safetensors.index.json").read_text())
        (partial / "model.safetensors.index.json").write_text(json.dumps({**index, "metadata": {"total_size": 1}}))
    with caplog.at_level(logging.WARNING):
        assert hub_alias.known_fingerprint(partial, cache) is None
    assert "ignoring hub alias" in caplog.text


def test_unwritable_cache_folder_costs_a_warning_not_the_plan(tmp_path, tiny_llama_dir, caplog):
    full = _snapshot(tmp_path / "a", tiny_llama_dir, shards=True)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        assert hub_alias.weights_fingerprint(full, blocked / "scores") == model_fingerprint(full)
    assert "could not record the hub alias" in caplog.text


@pytest.mark.engine
def test_engine_serves_mi_prun_from_cached_scores_without_the_pruned_only_shards(hub):
    """Replica A scores a complete snapshot; replica B plans from the cached scores and
    fetches only the kept blocks' shards. Served offline (vLLM swaps the id for B's snapshot
    folder, which lacks the pruned-only shards), its tokens equal A's complete snapshot's.
    It replaces the score-free partial-snapshot engine test: the loader path is the same."""
    from engine_kit import run_engines

    _plan(hub, "replica-a", revision=None)
    args, _ = _plan(hub, "replica-b", revision=None)
    kept = args.hf_overrides[remap.KEPT_FIELD]
    partial = hub.snapshot_folder(str(hub.root / "replica-b"), None)
    never = model_files.shard_split(partial, kept)[1]
    assert never and not any((partial / name).exists() for name in never)
    complete = hub.snapshot_folder(str(hub.root / "replica-a"), None)
    from_hub, full = run_engines(
        [{"model": REPO_ID, "load_format": "miprun", "extra": MI_PRUN},
         {"model": str(complete), "load_format": "miprun", "extra": MI_PRUN}],
        VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub.root / "replica-b"))
    assert from_hub["kept"] == full["kept"] == kept
    assert from_hub["tokens"] == full["tokens"]
    assert not any((partial / name).exists() for name in never)  # serving fetched nothing more
