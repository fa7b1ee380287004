"""A damaged heal-map file is fitted again with a warning, or refused in one line under require_cache.

Heal maps are derived data stored under a name keyed by everything they depend on, so a
damaged file there is a failed write or a failing disk, never a choice: refitting is the
first load's cost. ``require_cache`` forbids fitting at load, so there it is one line.
"""

from __future__ import annotations

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
                                    lambda raw: raw[:8] + b"[" + raw[9:]])
def test_damaged_heal_file_is_refitted_with_a_warning(tiny_llama_dir, tmp_path, stored, damage, caplog):
    maps, path = stored
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger=heal.logger.name):
        again = heal.prepare_maps(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS, progress=False)
    assert f"heal maps {path} cannot be read" in caplog.text and "fitting them again" in caplog.text
    assert sorted(again) == sorted(maps) and all(torch.allclose(again[s], maps[s], atol=1e-5) for s in maps)
    record = heal.heal_record(*_record_args(tiny_llama_dir, tmp_path))
    assert sorted(heal.read_maps(path, record)) == sorted(maps)  # the file was rewritten whole


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
