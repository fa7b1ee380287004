"""Workers that do not share the front process's environment: Ray actors, other nodes.

A Ray actor has its node's environment, not the front process's, and another node may
hold only the kept blocks' shards. The unit tests check the two pieces (folders carried
in the config; heal maps read on a partial snapshot); the engine test serves a healed
model with vLLM's Ray executor, tensor parallel 2 on CPU, on a local loopback cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from vllm_miprun.model import checkpoint
from vllm_miprun.options import CalibrationSettings, MiprunOptions
from vllm_miprun.pipeline import heal, store

KEEP_HALF = {"keep": 0.5, "method": "last"}
KEPT_HALF = [0, 1, 2, 7]  # "last" at keep 0.5 of 8 blocks


def _no_fit(*_args, **_kwargs):
    raise AssertionError("the stored heal maps must be read, not fitted again")


# --- the folders travel in the config ------------------------------------------------------


def test_workers_take_the_folders_from_the_config_not_their_environment(tiny_llama_dir, tmp_path, monkeypatch):
    from vllm.config.load import LoadConfig
    from vllm.engine.arg_utils import EngineArgs

    from vllm_miprun.model.remap import KEPT_FIELD
    from vllm_miprun.vllm import engine_args as hooks
    from vllm_miprun.vllm import loader, reports

    front, elsewhere = tmp_path / "front", tmp_path / "elsewhere"
    front.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv(reports.RUN_DIR_ENV, "")  # none yet; restored after the test
    monkeypatch.chdir(front)
    monkeypatch.setenv("MIPRUN_CACHE_DIR", "scores")  # relative: a Ray actor's working folder differs
    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun", model_loader_extra_config=dict(KEEP_HALF))
    hooks.prepare_engine_args(args)
    extra = args.model_loader_extra_config
    run_dir = Path(os.environ[reports.RUN_DIR_ENV])
    assert list(args.hf_overrides[KEPT_FIELD]) == KEPT_HALF

    # a worker on a node of its own: other values, other working folder, no run folder named
    monkeypatch.setenv("MIPRUN_CACHE_DIR", str(tmp_path / "node-scores"))
    monkeypatch.setenv("MIPRUN_HOME", str(tmp_path / "node-home"))
    monkeypatch.delenv(reports.RUN_DIR_ENV)
    monkeypatch.chdir(elsewhere)
    worker = loader.MiprunModelLoader(LoadConfig(load_format="miprun", model_loader_extra_config=extra))
    assert store.cache_folder(worker.options.cache_dir) == front / "scores"
    loader.record_report({"kept": KEPT_HALF, "num_blocks": 8, "load_seconds": 0.25}, worker.run_dir)
    report = json.loads((run_dir / f"{reports.LOAD_PREFIX}{os.getpid()}.json").read_text())
    assert report["load_seconds"] == 0.25 and report["kept"] == KEPT_HALF


def test_carried_keys_are_not_user_options():
    assert MiprunOptions.from_dict({**KEEP_HALF, "run_dir": "/somewhere"}).keep == 0.5
    with pytest.raises(Exception, match="unknown miprun option"):
        MiprunOptions.from_dict({**KEEP_HALF, "run_folder": "/somewhere"})


# --- heal maps on a node that fetched only the kept blocks' shards --------------------------


def _hub_snapshot(root: Path, tiny_model_dir: Path) -> Path:
    from fake_hub import write_sharded_repo

    folder = root / "models--org--tiny" / "snapshots" / ("c0ffee" * 7)[:40]
    write_sharded_repo(tiny_model_dir, folder, blocks_per_shard=1)
    return folder


def test_heal_maps_load_on_a_node_that_fetched_only_the_kept_shards(tiny_llama_dir, tmp_path, monkeypatch):
    from vllm_miprun.vllm.model_files import shard_split

    kept = [1, 2, 5, 6]
    full, partial = _hub_snapshot(tmp_path / "front", tiny_llama_dir), _hub_snapshot(tmp_path / "node", tiny_llama_dir)
    _, never_fetched = shard_split(partial, kept)
    assert never_fetched
    for name in never_fetched:
        (partial / name).unlink()
    options = MiprunOptions(heal="linear", calibration=CalibrationSettings(samples=4, seq_len=32), drop=(0, 3, 4, 7),
                            cache_dir=str(tmp_path / "scores"))
    fitted = heal.prepare_maps(full, options, kept, 8, progress=False)  # the front process, every shard
    assert sorted(fitted) == [0, 3, 7]

    monkeypatch.setattr(heal, "fit_maps", _no_fit)
    worker = dataclasses.replace(options, require_cache=True)
    read = heal.prepare_maps(partial, worker, kept, 8, progress=False)
    assert sorted(read) == sorted(fitted) and all(torch.equal(read[s], fitted[s]) for s in fitted)
    with pytest.raises(heal.HealError, match="lacks the shards .* no hub alias"):
        heal.prepare_maps(partial, dataclasses.replace(worker, cache_dir=str(tmp_path / "other")), kept, 8)
