"""The score cache's version policy, field by field: refused in one line, never read differently.

A file is read only when its ``format_version`` is exactly this code's, its
``code_version`` is a version string, every field a plan reads is there and every number
is finite (``store``'s module docstring states the policy).
"""

from __future__ import annotations

import json

import pytest

from vllm_miprun.pipeline import store as sc


def _cache_json(num_blocks: int = 3) -> dict:
    size = num_blocks + 1
    span = [[float(j - i) if i < j else None for j in range(size)] for i in range(size)]
    return sc.ScoreCache(
        fingerprint="sha256:abc", model={"name": "m", "num_blocks": num_blocks},
        calibration={"dataset": "wiki", "seed": 0}, estimator={"name": "gaussian"},
        block_scores=[1.0] * num_blocks, span_scores=span,
        baselines={"block_influence": [0.1] * num_blocks, "angular": span, "skip_mi_iso": span},
        timings={"total_s": 1.0},
    ).to_json()


def _read(tmp_path, text: str) -> sc.ScoreCache:
    path = tmp_path / "c.json"
    path.write_text(text)
    return sc.read_cache(path)


def _refused(tmp_path, text: str) -> str:
    with pytest.raises(sc.CacheError) as err:
        _read(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "c.json") in message
    return message


@pytest.mark.parametrize("version", [0, -7, True, False, "1", 1.0, None, [1], {"v": 1}])
def test_format_version_of_wrong_type_or_value_is_refused(tmp_path, version):
    data = _cache_json()
    data["format_version"] = version
    message = _refused(tmp_path, json.dumps(data))
    assert f"format_version must be the integer {sc.FORMAT_VERSION}, got {version!r}" in message


def test_missing_format_version_is_refused(tmp_path):
    data = _cache_json()
    del data["format_version"]
    assert "format_version must be the integer" in _refused(tmp_path, json.dumps(data))


@pytest.mark.parametrize("code", [None, 3, "", "not a version", "1.0\nx", ["0.1.0"]])
def test_code_version_must_be_a_version_string(tmp_path, code):
    data = _cache_json()
    data["code_version"] = code
    assert "code_version must be the version string" in _refused(tmp_path, json.dumps(data))


def test_other_code_version_of_the_same_format_reads_the_same_scores(tmp_path):
    """format_version is the contract: another release's cache of this format is read as is."""
    data = _cache_json()
    data["code_version"] = "0.0.9+older"
    cache = _read(tmp_path, json.dumps(data))
    assert cache.code_version == "0.0.9+older"
    assert cache.baselines == _cache_json()["baselines"] and cache.span_scores == _cache_json()["span_scores"]


def test_cache_without_skip_mi_iso_is_refused_not_planned_differently(tmp_path):
    data = _cache_json()
    data["code_version"] = "0.0.9"
    del data["baselines"]["skip_mi_iso"]
    message = _refused(tmp_path, json.dumps(data))
    assert "written by vllm-miprun 0.0.9 without baselines.skip_mi_iso" in message
    assert "vllm-miprun calibrate MODEL_DIR --force" in message


@pytest.mark.parametrize("key", ["fingerprint", "model", "calibration", "estimator", "block_scores",
                                 "span_scores", "baselines"])
def test_every_required_field_is_required(tmp_path, key):
    data = _cache_json()
    del data[key]
    assert f"{key!r} must be a" in _refused(tmp_path, json.dumps(data))


@pytest.mark.parametrize("key, value", [("selections", []), ("selections", {"sleb": [1]}),
                                        ("timings", [1]), ("profile", "fast"), ("throughput", 3)])
def test_optional_fields_of_the_wrong_type_are_refused(tmp_path, key, value):
    data = _cache_json()
    data[key] = value
    assert "wrong shape" in _refused(tmp_path, json.dumps(data))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize("where", ["block_scores", "span_scores", "skip_mi_iso", "timings"])
def test_non_finite_numbers_reach_the_finiteness_check(tmp_path, constant, where):
    """The JSON parser lets NaN and Infinity through (parse_constant), so the shape check
    refuses them naming the field, like 1e999."""
    marker = 12345.5
    data = _cache_json()
    if where == "block_scores":
        data["block_scores"][1] = marker
    elif where == "span_scores":
        data["span_scores"][0][2] = marker
    elif where == "skip_mi_iso":
        data["baselines"]["skip_mi_iso"] = [row[:] for row in data["span_scores"]]
        data["baselines"]["skip_mi_iso"][1][3] = marker
    else:
        data["timings"]["total_s"] = marker
    message = _refused(tmp_path, json.dumps(data).replace(str(marker), constant))
    assert "must be finite" in message and "not valid JSON" not in message


def test_integer_beyond_float_range_is_refused(tmp_path):
    text = json.dumps(_cache_json()).replace('"block_scores": [1.0', '"block_scores": [' + "9" * 400, 1)
    assert "must be finite" in _refused(tmp_path, text)


def test_deeply_nested_json_is_one_line(tmp_path):
    assert "not valid JSON" in _refused(tmp_path, "[" * 100_000)


def test_a_key_given_twice_is_refused(tmp_path):
    text = json.dumps(_cache_json()).replace('"fingerprint": "sha256:abc"',
                                             '"fingerprint": "sha256:abc", "fingerprint": "sha256:def"', 1)
    assert "appears more than once" in _refused(tmp_path, text)


def test_a_long_key_given_twice_is_named_in_a_short_line():
    from vllm_miprun import strict_json

    key = "k" * 5000
    with pytest.raises(ValueError) as err:
        strict_json.loads(json.dumps({"a": {key: 1}}).replace("}}", f', "{key}": 2}}}}'))
    assert str(err.value) == f"the key {key[:80]!r} appears more than once in one object"
    assert strict_json.loads('{"a": {"b": 1}, "b": {"b": 2}}') == {"a": {"b": 1}, "b": {"b": 2}}


# Shapes a mutation pass found accepted unchecked; each fails with its check removed.


def test_a_cache_of_no_blocks_is_refused(tmp_path):
    data = _cache_json(3)
    data.update(block_scores=[], span_scores=[[None]], num_blocks=0)
    data["baselines"] = {"block_influence": [], "angular": [[None]], "skip_mi_iso": [[None]]}
    assert "num_blocks=0 but 0 block scores" in _refused(tmp_path, json.dumps(data))


def test_a_span_score_below_the_diagonal_is_refused(tmp_path):
    data = _cache_json(3)
    data["span_scores"][2][1] = 0.5
    assert "span_scores" in _refused(tmp_path, json.dumps(data))


@pytest.mark.parametrize("selection", [{"2": [1, 1]}, {"1": [3]}, {"1": [-1]}, {"2": [0]}])
def test_a_stored_selection_must_name_distinct_blocks_of_the_model(tmp_path, selection):
    data = _cache_json(3)
    data["selections"] = {"sleb": selection}
    assert "distinct blocks in 0..2" in _refused(tmp_path, json.dumps(data))


def test_the_sweep_spares_a_young_temp_file_and_removes_an_old_one(tmp_path):
    import os
    import time

    temp = tmp_path / ".scores.json.abcdefgh.tmp"
    temp.write_text("{}")
    assert sc.sweep_stale_temps(tmp_path) == [] and temp.exists()  # young: a writer may be about to lock it
    old = time.time() - sc.STALE_TEMP_SECONDS - 1
    os.utime(temp, (old, old))
    assert sc.sweep_stale_temps(tmp_path) == [temp] and not temp.exists()
