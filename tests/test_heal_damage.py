"""A damaged heal-map file is fitted again with a warning, or refused in one line under require_cache.

Heal maps are derived data stored under a name keyed by everything they depend on, so a
damaged file there is a failed write or a failing disk, never a choice: refitting is the
first load's cost. ``require_cache`` forbids fitting at load, so there it is one line.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vllm_miprun.options import CalibrationSettings, MiprunOptions
from vllm_miprun.pipeline import heal, store

KEPT, NUM_BLOCKS = [1, 2, 4, 5], 8  # runs [0,1), [3,4), [6,8)


def _options(tmp_path, **kw) -> MiprunOptions:
    return MiprunOptions(keep=0.5, heal="linear", cache_dir=str(tmp_path / "cache"),
                         calibration=CalibrationSettings(samples=4, seq_len=32), **kw)


@pytest.fixture
def stored(tiny_llama_dir, tmp_path, monkeypatch):
    """(maps, their file) after one fit, written through the cache folder's atomic writer."""
    written = []
    real = store.atomic_write_bytes
    monkeypatch.setattr(store, "atomic_write_bytes", lambda path, payload: (written.append(path), real(path, payload)))
    maps = heal.prepare_maps(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS, progress=False)
    (path,) = (tmp_path / "cache").glob("*-heal-*.safetensors")
    assert written == [path] and maps
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return maps, path


@pytest.mark.parametrize("damage", [lambda raw: raw[:-7], lambda raw: raw[:50], lambda raw: b"\xff" * 64,
                                    lambda raw: raw[:8] + b"[" + raw[9:],
                                    lambda raw: raw[:-4] + b"\xff" * 4])  # a NaN in the last map
def test_damaged_heal_file_is_refitted_with_a_warning(tiny_llama_dir, tmp_path, stored, damage, caplog):
    maps, path = stored
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger=heal.logger.name):
        again = heal.prepare_maps(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS, progress=False)
    assert f"heal maps {path} cannot be read" in caplog.text and "fitting them again" in caplog.text
    assert sorted(again) == sorted(maps) and all(torch.allclose(again[s], maps[s], atol=1e-5) for s in maps)
    record = heal.heal_record(*_record_args(tiny_llama_dir, tmp_path))
    assert sorted(heal.read_maps(path, record)) == sorted(maps)  # the file was rewritten whole


def test_maps_of_another_width_are_fitted_again(tiny_llama_dir, tmp_path, stored, caplog):
    """Maps that agree with each other and with the record, but are not as wide as the model's
    hidden size, could only fail inside the fold: they are damaged, so fitted again."""
    from safetensors import safe_open
    from safetensors.torch import save

    maps, path = stored
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    path.write_bytes(save({f"map.{s}": torch.eye(3) for s in maps}, metadata=metadata))
    with caplog.at_level(logging.WARNING, logger=heal.logger.name):
        again = heal.prepare_maps(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS, progress=False)
    assert "is 3 wide, the model's hidden size is" in caplog.text and "fitting them again" in caplog.text
    assert all(torch.allclose(again[s], maps[s], atol=1e-5) for s in maps)


def test_damaged_heal_file_under_require_cache_is_one_line(tiny_llama_dir, tmp_path, stored):
    _, path = stored
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(heal.HealError) as err:
        heal.prepare_maps(tiny_llama_dir, _options(tmp_path, require_cache=True), KEPT, NUM_BLOCKS, progress=False)
    message = str(err.value)
    assert str(path) in message and "require_cache is set" in message and "\n" not in message


def _record_args(model_dir, tmp_path):
    from vllm_miprun.model.fingerprint import model_fingerprint

    return model_fingerprint(model_dir), _options(tmp_path).calibration.to_json(), KEPT, NUM_BLOCKS


RECORD = heal.heal_record("sha256:" + "a" * 64, {"dataset": "wiki"}, [0, 1, 3], 4)  # one run, at block 2


def _maps_file(tmp_path, tensors, metadata=None):
    from safetensors.torch import save

    path = tmp_path / "maps.safetensors"
    path.write_bytes(save(tensors, metadata=metadata or {"miprun": json.dumps(RECORD, sort_keys=True)}))
    return path


@pytest.mark.parametrize("tensors, why", [
    ({"map2": torch.ones(8)}, "not map.<block>"),  # was an IndexError
    ({"weight": torch.ones(8)}, "not map.<block>"),
    ({"map.٣": torch.ones(8)}, "not map.<block>"),
    ({}, "runs starting at [], the plan's runs start at [2]"),  # was read, and the run left unhealed
    ({"map.2": torch.ones(8), "map.3": torch.ones(8)}, "runs starting at [2, 3]"),
    ({"map.2": torch.ones(8, dtype=torch.int32)}, "torch.int32 tensor"),  # was folded as it is
    ({"map.2": torch.ones(8, dtype=torch.bool)}, "torch.bool tensor"),
    ({"map.2": torch.ones(8).to(torch.float8_e4m3fn)}, "torch.float8_e4m3fn tensor"),  # was NotImplementedError
    ({"map.2": torch.tensor(1.0)}, "shape []"),  # was an IndexError in the fold
    ({"map.2": torch.ones(2, 8)}, "shape [2, 8]"),
    ({"map.2": torch.ones(2, 2, 2)}, "shape [2, 2, 2]"),
    ({"map.2": torch.ones(0)}, "shape [0]"),
    ({"map.2": torch.full((8,), float("nan"))}, "not finite"),  # was folded into the weights
])
def test_maps_that_cannot_fold_are_damaged_not_a_traceback(tmp_path, tensors, why):
    """A file whose record matches but whose tensors are not the plan's maps is a failed
    write or disk: DamagedMapsError, which prepare_maps fits again (or refuses under
    require_cache), never an error inside the fold."""
    with pytest.raises(heal.DamagedMapsError, match="cannot be read") as err:
        heal.read_maps(_maps_file(tmp_path, tensors), RECORD)
    assert why in str(err.value)


def test_deeply_nested_metadata_is_damaged(tmp_path):
    path = _maps_file(tmp_path, {"map.2": torch.ones(8)}, {"miprun": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(heal.DamagedMapsError, match="cannot be read"):  # was a RecursionError
        heal.read_maps(path, RECORD)


def test_maps_narrower_than_the_model_are_damaged(tmp_path):
    path = _maps_file(tmp_path, {"map.2": torch.ones(8)})
    assert torch.equal(heal.read_maps(path, RECORD, width=8)[2], torch.ones(8))
    with pytest.raises(heal.DamagedMapsError, match="map.2 is 8 wide, the model's hidden size is 16"):
        heal.read_maps(path, RECORD, width=16)


def test_maps_of_the_plan_read_back(tmp_path):
    for transform in (torch.ones(8), torch.eye(8), torch.ones(8, dtype=torch.float16)):
        assert torch.equal(heal.read_maps(_maps_file(tmp_path, {"map.2": transform}), RECORD)[2], transform)
