"""The score cache: atomic, validated on every read, never trusted for other weights."""

from __future__ import annotations

import json
import os

import pytest

from vllm_miprun.pipeline import store as sc


def _cache(num_blocks: int = 3, fingerprint: str = "sha256:abc") -> sc.ScoreCache:
    size = num_blocks + 1
    span = [[float(j - i) if i < j else None for j in range(size)] for i in range(size)]
    return sc.ScoreCache(
        fingerprint=fingerprint, model={"name": "m", "num_blocks": num_blocks},
        calibration={"dataset": "wiki", "seed": 0}, estimator={"name": "gaussian"},
        block_scores=[1.0] * num_blocks, span_scores=span,
        baselines={"block_influence": [0.1] * num_blocks, "angular": span, "skip_mi_iso": span},
        timings={"total_s": 1.0},
    )


def test_round_trip_and_self_description(tmp_path):
    path = sc.write_cache(tmp_path / "c.json", _cache())
    data = json.loads(path.read_text())
    for key in ("format_version", "code_version", "fingerprint", "calibration", "estimator",
                "block_scores", "span_scores", "timings"):
        assert key in data
    again = sc.read_cache(path, "sha256:abc", {"dataset": "wiki", "seed": 0})
    assert again.to_json() == _cache().to_json()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.json")]  # no temp file left


@pytest.mark.parametrize("text, message", [
    ('{"format": "vllm-miprun-scores", "format_', "not valid JSON"),
    ("this is not json", "not valid JSON"),
    ('{"format": "vllm-miprun-scores", "format_version": 1}', "wrong shape"),
    ("[1, 2, 3]", "wrong shape"),
])
def test_corrupt_files_are_detected(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(sc.CacheError, match=message):
        sc.read_cache(path)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "oversized"])
def test_a_scores_path_that_is_not_a_cache_file_is_refused_before_reading(tmp_path, kind):
    """``scores`` is the user's path: a FIFO used to block the read forever, /dev/zero to
    read until memory ran out."""
    path = tmp_path / "c.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    elif kind == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as sparse:
            sparse.truncate(sc.MAX_CACHE_BYTES + 1)
    with pytest.raises(sc.CacheError, match="is not a regular file|bytes long") as err:
        sc.read_cache(path)
    assert "expected a score cache file" in str(err.value)


def test_truncated_real_cache_is_detected(tmp_path):
    path = sc.write_cache(tmp_path / "c.json", _cache())
    path.write_text(path.read_text()[:-40])
    with pytest.raises(sc.CacheError, match="corrupt"):
        sc.read_cache(path)


def test_newer_format_is_refused(tmp_path):
    data = _cache().to_json()
    data["format_version"] = sc.FORMAT_VERSION + 1
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sc.CacheError, match="newer than this vllm-miprun"):
        sc.read_cache(path)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_scores_are_refused(tmp_path, bad):
    path = tmp_path / "c.json"
    text = json.dumps(_cache().to_json()).replace('"block_scores": [1.0', f'"block_scores": [{bad}', 1)
    path.write_text(text)
    with pytest.raises(sc.CacheError):
        sc.read_cache(path)


@pytest.mark.parametrize("pruned", [[[1]], [{}], [True], [1.0]])
def test_selection_of_non_integer_blocks_is_refused(tmp_path, pruned):
    """Unhashable entries used to escape as a TypeError; True passed as block 1."""
    data = _cache().to_json()
    data["selections"] = {"sleb": {"1": pruned}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sc.CacheError, match="must list 1 distinct blocks in 0..2"):
        sc.read_cache(path)


@pytest.mark.parametrize("field, value, message", [
    ("timings", {"total_s": None}, "timings holds None"),
    ("timings", {"total_s": {"a": []}}, "timings holds"),
    ("timings", {"total_s": "1.0"}, "timings holds '1.0'"),
    ("model", {"name": "m", "hidden_size": "64"}, "model.hidden_size must be a positive integer"),
    ("model", {"name": "m", "hidden_size": [64]}, "model.hidden_size must be a positive integer"),
    ("model", {"name": "m", "hidden_size": 0}, "model.hidden_size must be a positive integer"),
    ("model", {"name": "m", "hidden_size": True}, "model.hidden_size must be a positive integer"),
    ("profile", {"batch_size": 1, "fixed_s": 0.0, "block_s": None}, "profile is not a latency profile"),
    ("profile", {"batch_size": 1, "fixed_s": 0.0, "block_s": 5}, "profile is not a latency profile"),
    ("profile", {"a": 1}, "profile is not a latency profile"),
    ("profile", {"batch_size": 1, "fixed_s": 0.0, "block_s": [0.1]}, "profile.block_s must list 3 costs"),
])
def test_fields_read_after_the_scores_are_checked_on_read(tmp_path, field, value, message):
    """Planning (hidden size, latency profile) and `vllm-miprun scores` (timings) read these;
    a wrong type used to escape there as a TypeError, AttributeError or bare ValueError."""
    data = _cache().to_json()
    data[field] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sc.CacheError, match=message):
        sc.read_cache(path)


def test_null_timings_read_as_none(tmp_path):
    from vllm_miprun.tools.cli import format_block_table

    data = _cache().to_json()
    data["timings"] = None
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert sc.read_cache(path).timings == {}
    assert "timings" in format_block_table(sc.read_cache(path))


def test_tampered_selection_is_refused(tmp_path):
    data = _cache().to_json()
    data["selections"] = {"sleb": {"2": [1, 7]}}  # block 7 does not exist in a 3-block model
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sc.CacheError, match="distinct blocks in 0..2"):
        sc.read_cache(path)


def test_foreign_weights_and_settings_are_refused(tmp_path):
    path = sc.write_cache(tmp_path / "c.json", _cache())
    with pytest.raises(sc.CacheError, match="belongs to other weights"):
        sc.read_cache(path, fingerprint="sha256:other")
    with pytest.raises(sc.CacheError, match="calibration settings"):
        sc.read_cache(path, "sha256:abc", {"dataset": "c4", "seed": 0})


def test_read_only_directory_fails_cleanly(tmp_path, monkeypatch):
    # Root ignores permission bits here, so the read-only file system is simulated.
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(sc.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(sc.CacheError, match="Read-only file system.*writable folder"):
        sc.write_cache(tmp_path / "c.json", _cache())
    assert not (tmp_path / "c.json").exists()


def test_unwritable_directory_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(sc.CacheError, match="cannot write score caches"):
        sc.ensure_writable(blocker / "scores")


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "c.json"
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, _):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    with pytest.raises(sc.CacheError, match="No space left"):
        sc.write_cache(target, _cache())
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_file_names_are_sanitised(tmp_path):
    path = sc.cache_path("../../etc/passwd", "sha256:x", {"dataset": "../../x"}, cache_dir=tmp_path)
    assert path.parent == tmp_path
    assert "/" not in path.name and not path.name.startswith(".")
    assert sc.safe_name("..//..\\evil name") == "evil_name"


def test_settings_change_the_key():
    assert sc.cache_key("f", {"seed": 0}) != sc.cache_key("f", {"seed": 1})
    assert sc.cache_key("f", {"seed": 0}) != sc.cache_key("g", {"seed": 0})
