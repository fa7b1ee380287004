"""``python -m calibration.run``'s own plumbing, fast: what each recipe is planned with (hub
settings, heal), the options the command hands the runner, and the summary table. The
recipe files themselves are ``test_calibration_run.py``'s; Ray runs are the slow tier's."""

from __future__ import annotations

import json
import sys

import huggingface_hub.constants
import pytest

from calibration import run
from calibration.recipe import Recipe
from fake_hub import REPO_ID, FakeHub, write_sharded_repo

SMALL = {"samples": 4, "seq_len": 32}


def test_a_hub_recipe_is_fetched_with_its_revision_and_download_folder(tmp_path, monkeypatch, tiny_llama_dir):
    write_sharded_repo(tiny_llama_dir, tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub(tmp_path / "remote", default_cache=tmp_path / "hf-default").install(monkeypatch)
    downloads = str(tmp_path / "downloads")
    recipe = Recipe(name="hub", model=REPO_ID, revision="v1", download_dir=downloads,
                    options={"method": "last"}, targets=({"keep": 0.5},))
    (row,) = run.run_recipe(recipe, str(tmp_path / "scores"))
    assert row["kept"] == [0, 1, 2, 7] and row["num_blocks"] == 8 and row["healed"] == "none"
    assert hub.calls and all((c["revision"], c["cache_dir"]) == ("v1", downloads)
                             for c in hub.calls if c["call"] == "snapshot_download")
    assert not (tmp_path / "hf-default").exists()


def test_a_healing_recipe_fits_its_maps_into_the_cache_folder(tmp_path, tiny_llama_dir):
    scores = tmp_path / "scores"
    plain = Recipe(name="plain", model=str(tiny_llama_dir), options={**SMALL, "method": "last"},
                   targets=({"keep": 0.75},))
    assert [row["healed"] for row in run.run_recipe(plain, str(scores))] == ["none"]
    assert not list(scores.glob("*-heal-*"))  # no heal, no maps
    healed = Recipe(name="healed", model=str(tiny_llama_dir), options={**SMALL, "method": "last"},
                    targets=({"keep": 0.75},), heal="linear")
    (row,) = run.run_recipe(healed, str(scores))
    assert row["healed"] == "linear" and len(row["kept"]) == 6
    assert len(list(scores.glob("*-heal-*.safetensors"))) == 1


@pytest.fixture
def handed(monkeypatch):
    """What ``main`` hands ``run_all`` (its Ray or in-process run is the other tests')."""
    seen = {}

    def run_all(recipes, cache_dir, use_ray, cpus=1, gpus=0):
        seen.update(recipes=recipes, cache_dir=cache_dir, use_ray=use_ray, cpus=cpus, gpus=gpus)
        return []

    monkeypatch.setattr(run, "run_all", run_all)
    return seen


def test_the_command_hands_the_runner_an_absolute_cache_folder_and_its_task_sizes(
        tmp_path, monkeypatch, handed):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "m", "targets": [{"keep": 0.5}]}))
    monkeypatch.chdir(tmp_path)
    assert run.main([str(recipe), "--no-ray", "--cache-dir", "rel"]) == 0
    assert handed["cache_dir"] == str(tmp_path.resolve() / "rel")  # a Ray worker's folder differs
    assert (handed["use_ray"], handed["cpus"], handed["gpus"]) == (False, 1, 0)
    assert [r.name for r in handed["recipes"]] == ["r"]

    monkeypatch.setenv("MIPRUN_CACHE_DIR", str(tmp_path / "env-scores"))
    assert run.main([str(recipe), "--cpus", "2", "--gpus", "0.5"]) == 0
    assert handed["cache_dir"] == str(tmp_path.resolve() / "env-scores")  # as vllm serve finds it
    assert (handed["use_ray"], handed["cpus"], handed["gpus"]) == (run.ray_available(), 2, 0.5)


def test_without_ray_installed_the_recipes_run_here(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert run.ray_available() is False


def test_the_summary_table_aligns_its_columns():
    rows = [{"recipe": "llama", "model": "m", "target": {"keep": 0.75}, "kept": [0, 1, 2, 3, 4, 5],
             "num_blocks": 8, "scores": "computed", "healed": "none", "seconds": 1.5, "cache": "/c/a.json"},
            {"recipe": "qwen2-long", "model": "m", "target": {"keep": 0.5, "protect": "0"}, "kept": [0, 1, 2, 3],
             "num_blocks": 8, "scores": "cache-hit", "healed": "linear", "seconds": 12.25, "cache": "/c/b.json"}]
    assert run.format_table(rows).splitlines() == [
        "recipe      target               kept  scores     healed  seconds  cache",
        "llama       keep=0.75            6/8   computed   none    1.5      /c/a.json",
        "qwen2-long  keep=0.5, protect=0  4/8   cache-hit  linear  12.25    /c/b.json",
    ]
