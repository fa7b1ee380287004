"""The option table: generated dataclasses and flags, README in step, drop lists, devices.

No vLLM import here (test_cli_options.py checks the flags inside vLLM's own parser).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_miprun import errors
from vllm_miprun.option_flags import add_command_flags, given_options, markdown_table, replace_readme_table
from vllm_miprun.options import (OPTIONS, TARGETS, CalibrationSettings, MiprunOptions, OptionError, check_drop,
                                 command_options, option, parse_device, parse_drop, resolve_device)
from vllm_miprun.core.selection.result import parse_protect

ROOT = Path(__file__).resolve().parents[1]


# --- one table -------------------------------------------------------------------------


def _options_table_script():
    """``scripts/options_table.py`` as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("options_table", ROOT / "scripts" / "options_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_documented_option_tables_match_the_table():
    script = _options_table_script()
    assert set(script.TABLE_FILES) == {"README.md", "docs/options.md"}
    for relative in script.TABLE_FILES:
        text = (ROOT / relative).read_text(encoding="utf-8")
        assert script.updated(relative, text) == text, f"{relative}: run python scripts/options_table.py"
        for row in OPTIONS:
            assert f"| `{row.name}` | `{row.serve_flag}` |" in text


def test_options_page_lists_every_environment_variable():
    """docs/options.md says its table lists all of envs.ENV_VARS: each has its row, and no row
    names a variable the code does not read."""
    from vllm_miprun import envs

    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", text, re.MULTILINE))
    assert rows == set(envs.ENV_VARS), rows ^ set(envs.ENV_VARS)


def test_environment_defaults_and_spellings(monkeypatch, tmp_path):
    """The defaults ENV_VARS and docs/options.md state, and every spelling of an opt-in."""
    from vllm_miprun import envs

    monkeypatch.delenv("MIPRUN_HOME", raising=False)
    monkeypatch.delenv("MIPRUN_CACHE_DIR", raising=False)
    assert envs.home() == Path.home() / ".cache" / "vllm-miprun"
    assert envs.cache_dir() == Path.home() / ".cache" / "vllm-miprun" / "scores"
    monkeypatch.setenv("MIPRUN_HOME", str(tmp_path))
    assert envs.cache_dir() == tmp_path / "scores"
    for value, allowed in (("1", True), ("true", True), (" YES ", True), ("On", True), ("TRUE", True),
                           ("0", False), ("no", False), ("", False), ("2", False)):
        monkeypatch.setenv(envs.ALLOW_UNTESTED_VLLM, value)
        assert envs.allow_untested_vllm() is allowed, value
    monkeypatch.delenv(envs.ALLOW_UNTESTED_VLLM)
    assert envs.allow_untested_vllm() is False


def test_readme_names_every_target():
    """The README's one sentence on targets lists every target the options accept."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    sentence = re.search(r"Give one target: ([^.]*)\.", text)
    assert sentence, "README lost its sentence on targets"
    assert set(re.findall(r"`([a-z_]+)`", sentence.group(1))) == set(TARGETS), sentence.group(0)


def test_documented_tables_change_when_a_help_text_changes(monkeypatch):
    """The drift check can fail: a changed help text no longer matches either file."""
    import vllm_miprun.option_flags as flags

    script = _options_table_script()
    changed = tuple(dataclasses.replace(row, help=row.help + " (changed)") if row.name == "seed" else row
                    for row in OPTIONS)
    monkeypatch.setattr(flags, "OPTIONS", changed)
    for relative in script.TABLE_FILES:
        text = (ROOT / relative).read_text(encoding="utf-8")
        assert script.updated(relative, text) != text
        assert replace_readme_table(text) != text
    assert "seed of `random` (changed)" in markdown_table()


def test_section_links_in_help_texts_point_at_each_files_page():
    """A help text's `(#healing)` becomes a path to docs/healing.md relative to each file."""
    script = _options_table_script()
    assert "](#healing)" in markdown_table()
    readme = script.updated("README.md", (ROOT / "README.md").read_text(encoding="utf-8"))
    options = script.updated("docs/options.md", (ROOT / "docs/options.md").read_text(encoding="utf-8"))
    assert "(see [Healing](docs/healing.md))" in readme and "(see [Healing](healing.md))" in options


def test_dataclass_fields_are_the_table_rows():
    plan_fields = {f.name: f for f in dataclasses.fields(MiprunOptions)}
    calibration_fields = {f.name: f for f in dataclasses.fields(CalibrationSettings)}
    for row in OPTIONS:
        owners = [f for f in (plan_fields.get(row.name), calibration_fields.get(row.name)) if f]
        assert owners, row.name
        assert all(f.default == row.default and f.metadata["help"] == row.help for f in owners)
    assert set(plan_fields) | set(calibration_fields) == {row.name for row in OPTIONS} | {"calibration"}
    # The calibration part keys the score cache: same fields, order and defaults as before.
    assert CalibrationSettings().to_json() == {"dataset": "wiki", "samples": 32, "seq_len": 256,
                                               "seed": 0, "estimator": "gaussian"}
    assert list(CalibrationSettings().to_json()) == ["dataset", "samples", "seq_len", "seed", "estimator"]


def test_every_source_gives_the_same_options():
    """Extra-config strings, Python values and CLI flags all end in equal dataclasses."""
    from_strings = MiprunOptions.from_dict({"keep": "0.5", "seed": "3", "samples": "4", "require_cache": "true",
                                            "protect": ["first", 5], "latency_budget": None})
    from_values = MiprunOptions(keep=0.5, seed=3, require_cache=True, protect="first,5",
                                calibration=CalibrationSettings(samples=4, seed=3))
    parser = argparse.ArgumentParser()
    add_command_flags(parser, command_options("export"), target_required=True)
    args = parser.parse_args(["--keep", "0.5", "--seed", "3", "--samples", "4", "--require-cache",
                              "--protect", "first,5"])
    assert from_strings == from_values == MiprunOptions.from_dict(given_options(args))


def test_cli_flags_are_checked_by_the_options_parsers(capsys):
    parser = argparse.ArgumentParser()
    add_command_flags(parser, command_options("plan"), target_required=True)
    for argv, message in [(["--keep", "1.5"], "keep must be a number in (0, 1], got '1.5'"),
                          (["--latency-budget", "fast"], "cannot read latency budget 'fast'"),
                          (["--drop", "5-3"], "runs backwards"),
                          (["--keep", "0.5", "--samples", "0"], "samples must be an integer >= 1"),
                          (["--keep", "0.5", "--drop", "3"], "not allowed with argument"),
                          (["--quality-budget", "1"], "quality_budget must be a finite number > 1")]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    # quality_budget may join latency_budget, so "a target is required" is the options' check.
    with pytest.raises(OptionError, match="miprun needs a target"):
        MiprunOptions.from_dict(given_options(parser.parse_args([])))
    both = given_options(parser.parse_args(["--quality-budget", "1.3", "--latency-budget", "0.8"]))
    assert MiprunOptions.from_dict(both).quality_budget == 1.3
    # Flags not given stay out of the namespace: defaults come from the table alone.
    assert given_options(parser.parse_args(["--keep", "0.5"])) == {"keep": 0.5}


# --- targets, drop ---------------------------------------------------------------------


@pytest.mark.parametrize("text, blocks", [
    ("12-18,25", (12, 13, 14, 15, 16, 17, 18, 25)),
    (" 25 , 3 - 4 ", (3, 4, 25)),
    ("7-7", (7,)),
    (4, (4,)),
    ([9, "1-2"], (1, 2, 9)),
    ((1, 2, 9), (1, 2, 9)),
])
def test_drop_parses_indices_and_ranges(text, blocks):
    assert parse_drop(text) == blocks
    assert parse_drop(parse_drop(text)) == blocks  # parsing a parsed value gives it back


@pytest.mark.parametrize("text, message", [
    ("18-12", "runs backwards; write 12-18"),
    ("3,1-4", "block(s) [3] more than once"),
    ("-1", "cannot read drop item '-1'"),
    ([-2], "negative"),
    ("a-b", "cannot read drop item 'a-b'"),
    ("1.5", "cannot read drop item '1.5'"),
    (",", "names no block"),
    ([], "names no block"),
    (True, "drop must be block indices"),
    ({"blocks": 3}, "drop must be block indices"),
])
def test_bad_drop_lists_are_refused(text, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        parse_drop(text)


def test_drop_is_checked_against_the_model():
    check_drop((0, 6), 8, frozenset({7}))
    with pytest.raises(OptionError, match=r"block\(s\) \[8, 9\], but the model has 8 blocks \(0..7\)"):
        check_drop((3, 8, 9), 8, frozenset())
    with pytest.raises(OptionError, match="all 8 blocks; at least one must be kept"):
        check_drop(tuple(range(8)), 8, frozenset())
    with pytest.raises(OptionError, match=r"block\(s\) \[0\] are both in drop and in protect"):
        check_drop((0, 1), 8, frozenset({0, 7}))


@pytest.mark.parametrize("raw, message", [
    ({}, "miprun needs a target"),
    ({"keep": 0.5, "latency_budget": "0.8"}, "give either keep or latency_budget, not both"),
    ({"keep": 0.5, "drop": "3"}, "give either keep or drop, not both"),
    ({"latency_budget": 0.8, "drop": [1]}, "give either latency_budget or drop, not both"),
    ({"drop": "3", "method": "sleb"}, "drop names the blocks itself"),
    ({"latency_budget": "1.5"}, "latency budget fraction must be in (0, 1]"),
    ({"latency_budget": "12 seconds"}, "cannot read latency budget"),
    ({"latency_budget": "0ms"}, "latency budget must be > 0 ms"),
    ({"keep": 0.5, "device": "tpu"}, "device must be one of auto, cpu, cuda or cuda:N"),
    ({"keep": 0.5, "kep": 1}, "unknown miprun option(s) ['kep']"),
])
def test_inconsistent_options_are_refused(raw, message):
    with pytest.raises(OptionError) as err:
        MiprunOptions.from_dict(raw)
    assert message in str(err.value)


@pytest.mark.parametrize("raw", [
    {"keep": 75}, {"latency_budget": "1.5"}, {"quality_budget": 0.9}, {"drop": [-1]},
    {"keep": 0.5, "protect": "31"},
])
def test_a_refusal_names_the_vllm_serve_flag_to_fix(raw):
    """The hint in a refusal names a flag a `vllm serve` user can type (the `--miprun-*` one)."""
    with pytest.raises((OptionError, ValueError)) as err:
        options = MiprunOptions.from_dict(raw)
        parse_protect(options.protect, 30)
    named = re.findall(r"e\.g\. (--[a-z-]+)", str(err.value))
    assert named and set(named) <= {row.serve_flag for row in OPTIONS}, str(err.value)


@pytest.mark.parametrize("argv, flag", [
    (["--keep", "1.5"], "--keep"),                              # argparse, the option's parser
    (["--latency-budget", "2"], "--latency-budget"),            # argparse, core.latency's message
    (["--keep", "0.5", "--method", "last", "--protect", "99"], "--protect"),  # after parsing, by the plan
    ([], "--keep"),                                             # no target: MiprunOptions
])
def test_a_vllm_miprun_command_names_its_own_flags_in_a_refusal(tiny_llama_dir, capsys, argv, flag):
    """The same refusals, from `vllm-miprun plan`, name the flags that command takes, never
    the `--miprun-*` ones of `vllm serve` (the user typed `--keep`)."""
    from vllm_miprun.tools import cli

    try:
        status = cli.main(["plan", str(tiny_llama_dir), *argv])
    except SystemExit as exit_:  # argparse's usage error
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"e.g. {flag} " in err and "--miprun-" not in err, err


def test_options_are_checked_before_calibration(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A bad budget, or a bad method late in stability's list, never reaches calibration."""
    from vllm_miprun.pipeline import calibrate
    from vllm_miprun.tools import cli

    calls = []
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: calls.append(a))
    code = cli.main(["stability", str(tiny_llama_dir), "--methods", "mi-prun,nope", "--cache-dir", str(tmp_path)])
    assert code == 2 and "method must be one of" in capsys.readouterr().err
    with pytest.raises(OptionError, match="latency budget fraction"):
        MiprunOptions.from_dict({"latency_budget": 2, "cache_dir": str(tmp_path)})
    with pytest.raises(SystemExit):
        cli.main(["plan", str(tiny_llama_dir), "--latency-budget", "12 s", "--cache-dir", str(tmp_path)])
    assert "cannot read latency budget '12 s'" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder" / "table.json"
    code = cli.main(["stability", str(tiny_llama_dir), "--cache-dir", str(tmp_path), "--json-out", str(missing)])
    assert code == 2 and f"the folder {missing.parent} does not exist" in capsys.readouterr().err
    code = cli.main(["stability", str(tiny_llama_dir), "--cache-dir", str(tmp_path), "--json-out", str(tmp_path)])
    assert code == 2 and "expects a file path, got the folder" in capsys.readouterr().err
    assert calls == [] and not list(tmp_path.iterdir())


def test_drop_plan_prunes_exactly_those_blocks_without_scores(tiny_llama_dir, tmp_path):
    from vllm_miprun.pipeline.plan import make_plan

    options = MiprunOptions.from_dict({"drop": "2-4,6", "cache_dir": str(tmp_path), "require_cache": True})
    plan = make_plan(tiny_llama_dir, options)
    assert plan.pruned == (2, 3, 4, 6) and plan.kept == (0, 1, 5, 7)
    assert (plan.method, plan.scores_source, plan.cache_path, plan.objective) == ("drop", "none-needed", None, None)
    assert plan.keep_ratio == 0.5 and plan.predicted_speedup > 1.0
    assert not list(tmp_path.iterdir())  # no calibration, no cache written
    for raw, message in [({"drop": "6-8"}, "the model has 8 blocks"),
                         ({"drop": "0-7"}, "at least one must be kept"),
                         ({"drop": "0-2", "protect": "first"}, "both in drop and in protect")]:
        with pytest.raises(OptionError, match=message):
            make_plan(tiny_llama_dir, MiprunOptions.from_dict(raw))


def test_cli_plan_with_drop(tiny_llama_dir, tmp_path, capsys):
    from vllm_miprun.tools import cli

    assert cli.main(["plan", str(tiny_llama_dir), "--drop", "1,3-4", "--json", "--cache-dir", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["pruned"] == [1, 3, 4] and plan["method"] == "drop"
    assert cli.main(["plan", str(tiny_llama_dir), "--drop", "7-9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-miprun plan: error: drop names block(s) [8, 9]") and err.count("\n") == 1


def test_eval_takes_drop_as_a_target():
    from vllm_miprun.tools import evaluate as ev

    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    args = parser.parse_args(["model", "--drop", "3-4", "--seed", "5", "--seq-len", "64"])
    assert ev.options_from_args(args) == {"drop": [3, 4]}  # --seed/--seq-len are eval's own
    assert (args.seed, args.seq_len) == (5, 64)
    dense = parser.parse_args(["model"])
    assert ev.options_from_args(dense) is None


# --- device ----------------------------------------------------------------------------


def test_device_accepts_auto_cpu_cuda_and_an_index():
    assert [parse_device(d) for d in ("auto", "cpu", "cuda", "cuda:1", " CUDA ")] == \
        ["auto", "cpu", "cuda", "cuda:1", "cuda"]
    for bad in ("gpu", "cuda:", "cuda:x", 0, None):
        with pytest.raises(OptionError, match="device must be one of"):
            parse_device(bad)
    assert MiprunOptions(keep=0.5).device == option("device").default == "auto"


def test_auto_is_resolved_at_the_point_of_use(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_parsing_options_imports_no_torch():
    """Parsing (as vllm serve's front process does) cannot initialise CUDA: torch stays unimported."""
    code = ("import sys; from vllm_miprun.options import MiprunOptions; "
            "o = MiprunOptions.from_dict({'keep': '0.5', 'device': 'auto', 'latency_budget': None}); "
            "assert o.device == 'auto'; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


# --- one error base class, one line, exit status 2 ---------------------------------------


def test_run_command_reports_user_errors_as_one_line(capsys):
    def fail():
        raise errors.CacheError("score cache x is corrupt:\nnot JSON; delete it")

    assert errors.run_command("vllm-miprun x", fail) == 2
    assert capsys.readouterr().err == "vllm-miprun x: error: score cache x is corrupt: not JSON; delete it\n"

    def interrupted():
        raise KeyboardInterrupt

    assert errors.run_command("vllm-miprun x", interrupted) == 130

    def bug():
        raise ZeroDivisionError("a bug, not bad input")

    with pytest.raises(ZeroDivisionError):  # programming errors keep their traceback
        errors.run_command("vllm-miprun x", bug)
    assert errors.run_command("p", lambda: (_ for _ in ()).throw(RuntimeError("engine died")),
                              also=(RuntimeError,)) == 2
    capsys.readouterr()
    denied = PermissionError(13, "Permission denied", "/srv/scores")  # an unwritable cache folder, say
    assert errors.run_command("p", lambda: (_ for _ in ()).throw(denied)) == 2
    assert capsys.readouterr().err == "p: error: [Errno 13] Permission denied: '/srv/scores'\n"


def test_every_error_class_is_a_miprun_error():
    for cls in (errors.OptionError, errors.CacheError, errors.ModelFolderError, errors.CorpusError,
                errors.EvalError):
        assert issubclass(cls, errors.MiprunError)


# Each value parser at its edges (cases a mutation pass found untested: each fails with the
# edge moved by one, a unit misread or a spelling dropped).
@pytest.mark.parametrize("raw, expected", [(1, 1.0), ("1", 1.0), (1.0, 1.0), ("0.75", 0.75), (1e-9, 1e-9)])
def test_keep_accepts_its_whole_range_up_to_one(raw, expected):
    from vllm_miprun.options import parse_keep

    assert parse_keep(raw) == expected


def test_shown_cuts_a_long_value_to_its_limit():
    from vllm_miprun.options import SHOWN_CHARS, shown

    cut = shown("x" * 500)
    assert len(cut) == SHOWN_CHARS and cut.endswith("...")
    assert shown("x" * 10) == repr("x" * 10)


@pytest.mark.parametrize("raw, expected", [("cuda:1", "cuda:1"), (" CUDA:2 ", "cuda:2"), ("auto", "auto")])
def test_device_accepts_cuda_n(raw, expected):
    from vllm_miprun.options import parse_device

    assert parse_device(raw) == expected


@pytest.mark.parametrize("raw", ["cuda:0abc", "cuda:", "cuda:-1", "gpu"])
def test_device_refuses_anything_else(raw):
    from vllm_miprun.options import parse_device

    with pytest.raises(OptionError, match="device must be one of"):
        parse_device(raw)


@pytest.mark.parametrize("raw, expected", [
    ("1kb", 1000), ("1kib", 1024), ("1k", 1024), ("2MB", 2 * 10**6), ("2MiB", 2 << 20), ("2m", 2 << 20),
    ("3GB", 3 * 10**9), ("3GiB", 3 << 30), ("1.5g", 3 << 29), ("1TB", 10**12), ("1tib", 1 << 40),
    ("1.5", 1), (4096, 4096), ("8 GiB", 8 << 30),
])
def test_sizes_read_decimal_and_binary_units(raw, expected):
    from vllm_miprun.options import parse_bytes

    assert parse_bytes(raw) == expected


@pytest.mark.parametrize("raw, ok", [("12345", True), ("0,99999", True), ("123456", False), ("first,-1", False)])
def test_protect_text_takes_indices_of_up_to_five_digits(raw, ok):
    from vllm_miprun.options import parse_protect as parse_protect_text

    if ok:
        assert parse_protect_text(raw) == raw
    else:
        with pytest.raises(OptionError, match="protect must be"):
            parse_protect_text(raw)


@pytest.mark.parametrize("raw, expected", [
    *[(word, True) for word in ("1", "true", "yes", "on", " TRUE ", True, 1)],
    *[(word, False) for word in ("0", "false", "no", "off", " Off", False, 0)],
])
def test_switches_read_every_spelling_of_true_and_false(raw, expected):
    from vllm_miprun.options import parse_bool

    assert parse_bool("require_cache")(raw) is expected


def test_the_top_level_help_describes_every_command_and_a_flow_that_parses(capsys):
    """`vllm-miprun --help` gives each subcommand a line of its own (the passthrough ones
    too), and the flow it shows is made of commands and flags that exist."""
    from vllm_miprun.tools import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = capsys.readouterr().out
    for name in [*cli.COMMANDS, "eval", *cli.PASSTHROUGH]:
        line = re.search(rf"^ {{4}}{name} +(\S.*)$", shown, re.MULTILINE)
        assert line and "--help" not in line.group(1), (name, shown)
    flow = [line.strip().split("  ")[0] for line in cli.USAGE_FLOW.splitlines()[1:]]
    assert len(flow) == 3 and flow[-1].startswith("vllm serve ")
    for command in flow[:-1]:
        argv = command.replace("MODEL_DIR", "/m").split()[1:]
        assert parser.parse_args(argv).command == argv[0]
    serve_flags = {word for word in flow[-1].split() if word.startswith("--")}
    assert serve_flags and serve_flags <= {row.serve_flag for row in OPTIONS}


def test_entry_wording_gives_a_switch_true_and_keeps_the_next_word_as_prose():
    from vllm_miprun.option_flags import entry_wording
    from vllm_miprun.options import OPTIONS

    switch = next(row for row in OPTIONS if row.switch)
    assert entry_wording(f"pass {switch.serve_flag} once") == \
        f'pass model_loader_extra_config={{"{switch.name}": true}} once'
    assert entry_wording(f"pass {switch.serve_flag}") == f'pass model_loader_extra_config={{"{switch.name}": true}}'
    assert entry_wording("e.g. --miprun-keep 0.75; or --miprun-method last") == \
        'e.g. model_loader_extra_config={"keep": 0.75}; or model_loader_extra_config={"method": "last"}'


def test_stability_agreement_is_the_mean_jaccard_over_pairs_and_ranges_print_compactly():
    from vllm_miprun.tools import cli

    assert cli.mean_pairwise_jaccard([{3, 4}]) == 1.0  # one seed: nothing disagrees
    assert cli.mean_pairwise_jaccard([{1, 2}, {2, 3}]) == 1 / 3  # |{2}| / |{1, 2, 3}|
    assert cli.mean_pairwise_jaccard([{1}, {1}, {1}, {2}]) == 3 / 6  # 6 pairs, 3 agree
    assert cli.compact_ranges([7, 0, 1, 2, 4, 6]) == "0-2,4,6-7"
    assert (cli.compact_ranges([5]), cli.compact_ranges([])) == ("5", "-")


def test_cli_stability_runs_every_seed_and_writes_its_table(tiny_llama_dir, tmp_path, capsys):
    from vllm_miprun.tools import cli

    out = tmp_path / "table.json"
    code = cli.main(["stability", str(tiny_llama_dir), "--methods", "last", "--seeds", "3", "--keep", "0.5",
                     "--cache-dir", str(tmp_path / "scores"), "--json-out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = json.loads(out.read_text())
    assert (table["keep"], table["seeds"]) == (0.5, 3)
    assert table["methods"]["last"] == {"mean_pairwise_jaccard": 1.0, "pruned_sets": [[3, 4, 5, 6]] * 3}


def test_cli_plan_never_calibrates(tiny_llama_dir, tmp_path, capsys):
    """`plan` reads the cached scores: with none, one line and exit 2, and no cache written."""
    from vllm_miprun.tools import cli

    assert cli.main(["plan", str(tiny_llama_dir), "--keep", "0.5", "--samples", "2", "--seq-len", "16",
                     "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cli_calibrate_force_recomputes_a_matching_cache(tiny_llama_dir, tmp_path, capsys):
    from vllm_miprun.tools import cli

    args = ["calibrate", str(tiny_llama_dir), "--samples", "2", "--seq-len", "16", "--cache-dir", str(tmp_path)]
    verbs = []
    for extra in ([], [], ["--force"]):
        assert cli.main(args + extra) == 0
        verbs.append(capsys.readouterr().out.split()[0])
    assert verbs == ["wrote", "reused", "wrote"]
