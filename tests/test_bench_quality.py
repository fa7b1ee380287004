"""The quality benchmark's row merging (pure logic on a small JSON file)."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py")
bench_quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_quality)


def _args(tmp_path: Path, **over) -> Namespace:
    base = dict(out=tmp_path, name="q", backend="transformers", limit=20, ppl_windows=8, seq_len=512,
                dtype="float32")
    return Namespace(**{**base, **over})


def _write_old(tmp_path: Path) -> None:
    records = [{"row": "dense", "keep": 1.0}, {"row": "mi-prun", "keep": 0.9}, {"row": "shortgpt", "keep": 0.9},
               {"row": "mi-prun", "keep": 0.8}]
    (tmp_path / "q.json").write_text(json.dumps({
        "command": "python bench_quality.py", "backend": "transformers", "limit": 20, "ppl_windows": 8,
        "seq_len": 512, "dtype": "float32", "records": records,
        "stability": {"mi-prun": {"0.9": 0.8, "0.8": 0.9}, "shortgpt": {"0.9": 1.0}}}))


def test_merge_keeps_the_rows_not_rerun_and_says_which_command_made_them(tmp_path):
    _write_old(tmp_path)
    records, stable, commands = bench_quality.previous_rows(_args(tmp_path), {("mi-prun", 0.9)})
    assert [r["row"] for r in records] == ["dense", "shortgpt", "mi-prun"]
    assert stable == {"mi-prun": {"0.8": 0.9}, "shortgpt": {"0.9": 1.0}}
    assert commands == [{"command": "python bench_quality.py",
                         "rows": ["dense@1", "mi-prun@0.8", "shortgpt@0.9"]}]
    # a second merge reads the row@keep provenance it wrote
    (tmp_path / "q.json").write_text(json.dumps({**json.loads((tmp_path / "q.json").read_text()),
                                                 "commands": commands}))
    _, _, again = bench_quality.previous_rows(_args(tmp_path), {("mi-prun", 0.8), ("mi-prun", 0.9)})
    assert again == [{"command": "python bench_quality.py", "rows": ["dense@1", "shortgpt@0.9"]}]


def test_merge_refuses_rows_made_with_other_settings(tmp_path):
    _write_old(tmp_path)
    with pytest.raises(SystemExit, match="other settings.*limit"):
        bench_quality.previous_rows(_args(tmp_path, limit=50), {("mi-prun", 0.9)})


def test_merge_without_an_earlier_file_starts_empty(tmp_path):
    assert bench_quality.previous_rows(_args(tmp_path), {("mi-prun", 0.9)}) == ([], {}, [])
