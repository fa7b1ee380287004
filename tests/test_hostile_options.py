"""Hostile configuration: any value of any JSON type gets one line and a non-zero exit, never a traceback.

A seeded fuzzer builds configurations the way a user (or a script gone wrong) could write
them in ``--model-loader-extra-config`` or a ``--miprun-*`` flag: NaN, 1e400, 10**400,
nested objects, lists where a scalar is expected, empty, blank, NUL-holding and oversized
strings, unknown keys, non-object roots, duplicate keys. Most go through the real
validation path (``MiprunOptions.from_dict``, the flag parser, the strict JSON parse of
``--model-loader-extra-config``); a handful go through the real ``vllm serve`` command,
which must stop in its front process before any engine exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from engine_kit import VLLM
from vllm_miprun import option_flags
from vllm_miprun.options import OPTIONS, MiprunOptions, OptionError

SEED = 20261203
CASES = 160
TEXT_OPTIONS = {"scores", "cache_dir", "dataset"}  # any non-empty path-like text is valid there
HUGE_INT = 10**400


def _hostile_values() -> list:
    """Values no option accepts."""
    return [math.nan, math.inf, -math.inf, float("1e400"), HUGE_INT, -HUGE_INT, 10**5000, {}, {"a": {"b": {"c": 1}}},
            [[1]], [{"keep": 0.5}], [], "", "   ", "\0", "x" * 100_000, -1.5]


def _hostile_for_non_text() -> list:
    """Text no number, choice, flag or block list accepts (valid as a path, so not for TEXT_OPTIONS)."""
    return ["nan", "1e400", "-1", "0-99999999999", "9" * 400, "true false", "[0.5]", "{}", "12-", "ms"]


def _generated(seed: int = SEED, count: int = CASES) -> list[tuple[str, object, str]]:
    """(case id, raw config, what the one error line must name), seeded."""
    rng = random.Random(seed)
    cases = []
    for number in range(count):
        kind = rng.choice(["value", "value", "value", "unknown key", "root"])
        if kind == "value":
            row = rng.choice(OPTIONS)
            pool = _hostile_values() + ([] if row.name in TEXT_OPTIONS else _hostile_for_non_text())
            value = rng.choice(pool)
            if row.name == "require_cache" and value in ("", "   "):
                value = "perhaps"
            raw = {"keep": 0.5} if row.name not in ("keep", "latency_budget", "drop") else {}
            raw[row.name] = value
            expected = row.name
        elif kind == "unknown key":
            key = rng.choice(["kep", "Keep", "keep ", "", "miprun_keep", "\0", "k" * 5000, "☃", "__proto__"])
            raw, expected = {"keep": 0.5, key: rng.choice([0.5, None, {}, "x"])}, "unknown miprun option"
        else:
            raw = rng.choice([[{"keep": 0.5}], "keep=0.5", 0.5, HUGE_INT, True, [["keep", 0.5]]])
            expected = "must be a JSON object"
        cases.append((f"{number}-{kind}", raw, expected))
    return cases


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 1000, message[:2000]


@pytest.mark.parametrize("case, raw, expected", _generated(), ids=[c[0] for c in _generated()])
def test_fuzzed_extra_config_is_refused_in_one_line(case, raw, expected):
    with pytest.raises(OptionError) as err:
        MiprunOptions.from_dict(raw)
    message = str(err.value)
    _one_line(message)
    assert expected.replace("_", " ") in message.replace("_", " "), (case, message)


def test_the_fuzzer_covers_every_option_and_kind():
    cases = _generated()
    named = {expected for _, _, expected in cases}
    assert len(cases) >= 100 and {row.name for row in OPTIONS} <= named
    assert {"unknown miprun option", "must be a JSON object"} <= named


@pytest.fixture(scope="module")
def flag_parser() -> argparse.ArgumentParser:
    return option_flags.add_serve_flags(argparse.ArgumentParser(prog="vllm serve"))


def _as_flag_text(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except ValueError:  # an integer beyond Python's printable digits: the flag would say as much
        return "9" * 5000


def _flag_cases() -> list[tuple]:
    """The generated bad values that a flag can carry: not for switches (they take no value),
    nor non-empty texts a path option accepts."""
    cases = []
    for case, raw, expected in _generated():
        if not case.endswith("value"):
            continue
        row = next(r for r in OPTIONS if r.name == expected)
        if row.switch:
            continue
        text = _as_flag_text(raw[row.name])
        if row.name in TEXT_OPTIONS and text.strip() and "\0" not in text and len(text) <= 4096:
            continue
        cases.append((case, raw, expected))
    return cases


@pytest.mark.parametrize("case, raw, expected", _flag_cases(), ids=[c[0] for c in _flag_cases()])
def test_fuzzed_flag_values_are_one_argparse_error(flag_parser, capsys, case, raw, expected):
    row = next(r for r in OPTIONS if r.name == expected)
    text = _as_flag_text(raw[row.name])
    with pytest.raises(SystemExit) as exit_:
        flag_parser.parse_args([row.serve_flag, text])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and row.serve_flag in errors[0] and len(errors[0]) < 1000 or row.choices, errors


@pytest.mark.parametrize("text", [
    '{"keep": 0.5, "keep": 0.7}', '{"keep": 0.5, "method": "last", "method": "last"}',
    '{"keep": 0.5, "nested": {"a": 1, "a": 2}}', '[{"keep": 0.5}]', '"keep"', "0.5", "null", "{keep: 0.5}",
    "[" * 100_000, '{"keep": 0.5', "",
])
def test_extra_config_json_is_an_object_without_repeated_keys(text):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        option_flags.extra_config_json(text)
    _one_line(str(err.value))
    assert "--model-loader-extra-config must be a JSON object" in str(err.value)


@pytest.mark.parametrize("raw", [{"keep": [10**5000]}, {"keep": {"a": -10**5000}}, {"latency_budget": 10**5000},
                                 {"keep": 0.5, "protect": 10**5000}, {"keep": 0.5, "protect": [1, 10**5000]},
                                 {"drop": [10**5000]}, {"keep": 0.5, "seed": [10**5000]}])
def test_integers_of_over_4300_digits_inside_values_are_refused_in_one_line(raw):
    """Python refuses to turn them into text; that ValueError (or an AttributeError from
    the error message's own shortening) used to escape instead of the option's error."""
    name = next(key for key in raw if key != "keep" or len(raw) == 1)
    with pytest.raises(OptionError, match=name) as err:
        MiprunOptions.from_dict(raw)
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


@pytest.mark.parametrize("drop", [["0-99999"] * 50, "0-99999," * 50])
def test_a_drop_that_repeats_long_ranges_stops_at_the_first_repeat(drop, monkeypatch):
    """Each range expanded in full before the repeat check: 1,000 copies of 0-99999 (14 kB
    of JSON) took 4 GB, a list of 99,999 copies would take 10**10 integers."""
    from vllm_miprun import option_values

    expanded = []
    real = option_values._drop_item
    monkeypatch.setattr(option_values, "_drop_item", lambda item: expanded.append(real(item)) or expanded[-1])
    with pytest.raises(OptionError, match="more than once") as err:
        MiprunOptions.from_dict({"drop": drop})
    assert sum(map(len, expanded)) <= 200_000
    assert len(str(err.value)) < 400  # the repeated blocks are shown cut, like the value


def test_extra_config_json_passes_nan_and_huge_numbers_to_the_option_parsers():
    raw = option_flags.extra_config_json('{"keep": NaN, "samples": 1' + "0" * 400 + "}")
    assert math.isnan(raw["keep"]) and raw["samples"] == HUGE_INT
    with pytest.raises(OptionError, match="keep must be a number"):
        MiprunOptions.from_dict({"keep": raw["keep"]})
    with pytest.raises(OptionError, match="samples must be an integer"):
        MiprunOptions.from_dict({"keep": 0.5, "samples": raw["samples"]})


# --- the real `vllm serve` front process: one error line, no traceback, no engine ------------
# Marked `engine` (run them under the machine's engine lock, like the engine tests): each
# starts vLLM's CLI (about 15 s of imports), though none gets as far as an engine.

SERVE_CASES = {
    "huge integer in extra config": (["--load-format", "miprun", "--model-loader-extra-config",
                                      '{"keep": 1' + "0" * 400 + "}"], 1, "keep must be a number"),
    "duplicate key in extra config": (["--load-format", "miprun", "--model-loader-extra-config",
                                       '{"keep": 0.5, "keep": 0.7}'], 2, "appears more than once"),
    "nested object where a list is expected": (["--miprun-keep", "0.5", "--model-loader-extra-config",
                                                '{"protect": {"a": [1, {"b": NaN}]}}'], 1, "protect must be"),
    "1e400 in a flag": (["--miprun-keep", "1e400"], 2, "keep must be a number"),
    "truncated shard": (["--miprun-drop", "3-4"], 1, "is damaged"),
}


@pytest.mark.engine
@pytest.mark.skipif(not VLLM.exists(), reason="the vllm command is not installed")
@pytest.mark.parametrize("name", sorted(SERVE_CASES))
def test_vllm_serve_exits_in_the_front_process_with_one_line(tiny_llama_dir, tmp_path, name):
    flags, code, words = SERVE_CASES[name]
    if name == "truncated shard":
        tiny_llama_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
        (shard,) = tiny_llama_dir.glob("*.safetensors")
        shard.write_bytes(shard.read_bytes()[:-10])
        words = f"safetensors file {shard} is damaged"
    env = {**os.environ, "MIPRUN_CACHE_DIR": str(tmp_path / "scores"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([str(VLLM), "serve", str(tiny_llama_dir), "--enforce-eager", *flags],
                          env=env, capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "error:" in line]
    assert done.returncode == code and len(errors) == 1 and words in errors[0], output[-4000:]
    assert "Traceback" not in output and len(errors[0]) < 1000
    assert "EngineCore" not in output and "Starting vLLM" not in output  # stopped before any engine


def test_serve_parser_reads_the_extra_config_strictly(serve_parser, capsys):
    """``vllm serve``'s own ``--model-loader-extra-config`` goes through the strict reader once
    the plugin's flags are added: a key given twice is one argparse error, not the last value."""
    with pytest.raises(SystemExit) as exit_:
        serve_parser.parse_args(["--model-loader-extra-config", '{"keep": 0.5, "keep": 0.7}'])
    assert exit_.value.code == 2
    assert "--model-loader-extra-config must be a JSON object" in capsys.readouterr().err
    args = serve_parser.parse_args(["--model-loader-extra-config", '{"keep": 0.5}'])
    assert args.model_loader_extra_config == {"keep": 0.5}
