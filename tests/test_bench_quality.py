"""The quality benchmark's row merging (pure logic on a small JSON file)."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_quality imports heal_table
_SPEC = importlib.util.spec_from_file_location(
    "bench_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py")
bench_quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_quality)
heal_table = bench_quality.heal_table


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


def test_concurrent_merge_runs_keep_each_others_rows(tmp_path, monkeypatch):
    """Two --merge runs with different rows save in turn: each write re-reads the file."""
    monkeypatch.setattr(bench_quality, "write_outputs", _write_json_only)
    args = _args(tmp_path, merge=True)
    first = [{"row": "mi-prun", "keep": 0.75, "heal": "none"}]
    second = [{"row": "sleb", "keep": 0.75, "heal": "none"}]
    bench_quality.save(args, {("mi-prun", 0.75)}, first, {}, {"command": "a", "rows": ["mi-prun@0.75"]})
    bench_quality.save(args, {("sleb", 0.75)}, second, {}, {"command": "b", "rows": ["sleb@0.75"]})
    # the first run writes again after its next row: the second run's row survives
    bench_quality.save(args, {("mi-prun", 0.75)}, first, {}, {"command": "a", "rows": ["mi-prun@0.75"]})
    saved = json.loads((tmp_path / "q.json").read_text())
    assert sorted(r["row"] for r in saved["records"]) == ["mi-prun", "sleb"]
    assert [c["command"] for c in saved["commands"]] == ["b", "a"]


def _write_json_only(args, records, stable, commands):
    (args.out / args.name).with_suffix(".json").write_text(json.dumps({
        "backend": args.backend, "limit": args.limit, "ppl_windows": args.ppl_windows, "seq_len": args.seq_len,
        "dtype": args.dtype, "records": records, "stability": stable, "commands": commands}))


def _record(row, keep, heal, ppl, zero=0.4):
    tasks = {f"{domain}-ppl": {"ppl": value} for domain, value in ppl.items()}
    return {"row": row, "keep": keep, "heal": heal, "pruned": [1], "eval": {"tasks": tasks, "mc_avg_acc_norm": zero}}


UNLIKE = ("tiny", "technical", "code", "multilingual")


def test_heal_goals_are_judged_on_the_unlike_domains():
    plain = dict(zip(UNLIKE, (100.0, 100.0, 100.0, 100.0)), wiki=50.0)
    healed = dict(zip(UNLIKE, (80.0, 80.0, 80.0, 101.0)), wiki=500.0)  # wiki is a calibration domain
    sleb = dict(zip(UNLIKE, (90.0, 90.0, 90.0, 90.0)))
    records = [_record("mi-prun", 0.75, "none", plain), _record("mi-prun", 0.75, "linear", healed),
               _record("sleb", 0.75, "none", sleb)]
    goals = {g["goal"].split(" (")[0]: g for g in heal_table.check_goals(records)}
    ratio = (0.8 ** 3 * 1.01) ** 0.25
    assert goals["MI-PRUN heal=linear <= 0.85x unhealed"]["met"] == (ratio <= 0.85)
    assert f"{ratio:.3f}x" in goals["MI-PRUN heal=linear <= 0.85x unhealed"]["detail"]
    assert goals["no unlike domain more than 2% worse than unhealed"]["met"]  # multilingual +1%
    assert "multilingual +1.0%" in goals["no unlike domain more than 2% worse than unhealed"]["detail"]
    beats = goals["MI-PRUN heal=linear beats unhealed SLEB"]
    assert beats["met"] and "lower on 3 of 4 domains" in beats["detail"]
    assert "MI-PRUN heal=linear beats SLEB heal=linear" not in goals  # no healed SLEB row: no such goal
    healed_sleb = _record("sleb", 0.75, "linear", dict(zip(UNLIKE, (70.0, 85.0, 85.0, 85.0))))
    same_way = {g["goal"].split(" (")[0]: g for g in heal_table.check_goals(records + [healed_sleb])}
    assert not same_way["MI-PRUN heal=linear beats SLEB heal=linear"]["met"]  # 84.8 against 81.0
    assert "lower on 2 of 4 domains" in same_way["MI-PRUN heal=linear beats SLEB heal=linear"]["detail"]


def test_heal_goal_fails_when_one_domain_is_more_than_two_percent_worse():
    plain = dict(zip(UNLIKE, (100.0,) * 4))
    healed = dict(zip(UNLIKE, (50.0, 50.0, 50.0, 103.0)))
    records = [_record("mi-prun", 0.6, "none", plain), _record("mi-prun", 0.6, "linear", healed)]
    goals = heal_table.check_goals(records)
    assert [g["met"] for g in goals] == [True, False]
    table = heal_table.markdown(records, 20, 8)
    assert "| 0.6 | mi-prun | linear |" in table and "multilingual +3.0%" in table


def test_heal_effect_is_none_without_a_plain_twin_or_a_domain():
    healed = _record("mi-prun", 0.6, "linear", dict(zip(UNLIKE, (50.0,) * 4)))
    assert heal_table.heal_effect([], [healed]) is None
    partial = _record("mi-prun", 0.6, "none", {"tiny": 100.0, "wiki": 40.0})  # no technical/code/multilingual
    assert heal_table.heal_effect([partial], [healed]) is None
    table = heal_table.markdown([healed], None, 8)
    assert "| 0.6 | mi-prun | linear |" in table and "| - | - |" in table
