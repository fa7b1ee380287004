"""The --miprun-* flags in vLLM's own serve parser, and planning before any engine starts.

These import vLLM (a few seconds) but start no engine.
"""

from __future__ import annotations

import pytest

from vllm_miprun.model import remap
from vllm_miprun.options import RUN_DIR_KEY, OptionError




def _given(extra: dict) -> dict:
    """The loader config without the folders the front process adds for its workers."""
    return {key: value for key, value in extra.items() if key not in ("cache_dir", RUN_DIR_KEY)}


def _engine_args(parser, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("flags, message", [
    (["--miprun-keep", "0"], "keep must be a number in (0, 1], got '0'"),
    (["--miprun-keep", "1.5"], "got '1.5'"),
    (["--miprun-keep", "abc"], "got 'abc'"),
    (["--miprun-keep", "nan"], "got 'nan'"),
    (["--miprun-method", "nope"], "invalid choice: 'nope'"),
    (["--miprun-latency-budget", "fast"], "cannot read latency budget 'fast'"),
    (["--miprun-drop", "18-12"], "drop range '18-12' runs backwards"),
    (["--miprun-device", "tpu"], "device must be one of auto, cpu, cuda or cuda:N"),
    (["--miprun-samples", "0"], "samples must be an integer >= 1"),
])
def test_bad_flag_values_are_argparse_errors(serve_parser, tiny_llama_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        serve_parser.parse_args(["--model", str(tiny_llama_dir), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_become_extra_config_and_imply_miprun(serve_parser, tiny_llama_dir):
    args = _engine_args(serve_parser, "--model", str(tiny_llama_dir), "--miprun-keep", "0.5",
                        "--miprun-method", "last")
    assert args.load_format == "miprun"
    assert _given(args.model_loader_extra_config) == {"keep": 0.5, "method": "last"}
    assert args.hf_overrides[remap.KEPT_FIELD] == [0, 1, 2, 7]
    assert args.hf_overrides["num_hidden_layers"] == 4


FLAGS_HALF = ["--miprun-keep", "0.5", "--miprun-method", "last"]


def test_with_the_rust_frontend_the_front_process_still_plans_and_says_the_gauges_are_missing(
        serve_parser, tiny_llama_dir, monkeypatch, caplog):
    """``VLLM_USE_RUST_FRONTEND=1 vllm serve``: vLLM's ``run_multi_api_server`` builds the engine
    args with ``from_cli_args`` (the plan, written back into the namespace it passes to the Rust
    process as JSON); the Rust frontend then serves ``/metrics`` without the plugin's gauges."""
    import logging

    from vllm_miprun.vllm import engine_args

    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    args = serve_parser.parse_args(["--model", str(tiny_llama_dir), *FLAGS_HALF])
    with caplog.at_level(logging.WARNING, logger=engine_args.logger.name):
        from vllm.engine.arg_utils import AsyncEngineArgs

        planned = AsyncEngineArgs.from_cli_args(args)
    assert planned.hf_overrides[remap.KEPT_FIELD] == [0, 1, 2, 7]
    assert args.hf_overrides[remap.KEPT_FIELD] == [0, 1, 2, 7] and args.load_format == "miprun"
    assert caplog.text.count("miprun_* gauges are not exported") == 1


@pytest.mark.parametrize("load_format, options", [
    ("MIPRUN", FLAGS_HALF),
    ("MiPrun", FLAGS_HALF),
    ("AUTO", FLAGS_HALF),
    ("MiPrun", ["--model-loader-extra-config", '{"keep": 0.5, "method": "last"}']),
], ids=["MIPRUN-flags", "MiPrun-flags", "AUTO-flags", "MiPrun-extra-config"])
def test_flags_take_the_load_format_in_any_case_as_vllm_does(serve_parser, tiny_llama_dir, load_format, options):
    """vLLM lower-cases --load-format, so `MIPRUN` or `AUTO` with --miprun-* flags is miprun,
    and `MiPrun` with no flag is planned in the front process all the same."""
    args = _engine_args(serve_parser, "--model", str(tiny_llama_dir), "--load-format", load_format, *options)
    assert args.load_format.lower() == "miprun"
    assert args.hf_overrides[remap.KEPT_FIELD] == [0, 1, 2, 7]


def test_every_table_option_is_a_serve_flag(serve_parser):
    from vllm_miprun.options import OPTIONS

    flags = serve_parser._option_string_actions
    assert all(row.serve_flag in flags and flags[row.serve_flag].help.startswith(row.help.replace("`", "")[:20])
               for row in OPTIONS)


@pytest.mark.parametrize("extra", ['{"drop": [1, 2, 5]}', '{"drop": "1,2,5"}'])
def test_drop_flag_prunes_exactly_those_blocks(serve_parser, tiny_llama_dir, extra):
    args = _engine_args(serve_parser, "--model", str(tiny_llama_dir), "--miprun-drop", "1-2,5",
                        "--model-loader-extra-config", extra)  # same blocks, compared parsed: no conflict
    assert args.load_format == "miprun"
    assert _given(args.model_loader_extra_config) == {"drop": [1, 2, 5]}
    assert args.hf_overrides[remap.KEPT_FIELD] == [0, 3, 4, 6, 7]
    assert args.hf_overrides["num_hidden_layers"] == 5


def test_dotted_extra_config_plans_too(serve_parser, tiny_llama_dir):
    args = _engine_args(serve_parser, "--model", str(tiny_llama_dir), "--load-format", "miprun",
                        "--model-loader-extra-config.keep", "0.75",
                        "--model-loader-extra-config.method", "last")
    assert args.hf_overrides["num_hidden_layers"] == 6


@pytest.mark.parametrize("flags, message", [
    (["--miprun-keep", "0.5", "--miprun-latency-budget", "0.8"], "not both"),
    (["--miprun-keep", "0.5", "--miprun-drop", "3"], "give either keep or drop, not both"),
    (["--miprun-drop", "3-9"], "but the model has 8 blocks"),
    (["--miprun-drop", "3", "--model-loader-extra-config", '{"drop": "4"}'], "given twice"),
    (["--miprun-keep", "0.5", "--model-loader-extra-config", '{"keep": 0.75}'], "given twice"),
    (["--miprun-keep", "0.5", "--load-format", "safetensors"], "--load-format miprun"),
    (["--load-format", "miprun"], "miprun needs a target"),
    (["--load-format", "miprun", "--model-loader-extra-config", '{"keep": 0.5, "kep": 1}'], "unknown miprun option"),
])
def test_inconsistent_options_exit_with_one_line(serve_parser, tiny_llama_dir, flags, message):
    with pytest.raises(SystemExit) as exit_:
        _engine_args(serve_parser, "--model", str(tiny_llama_dir), *flags)
    assert str(exit_.value.code).startswith("vllm-miprun: error: ")
    assert message in str(exit_.value.code)


@pytest.mark.parametrize("config, entry", [
    ({"keep": 2}, '{"keep": 0.75}'),                                       # the option's parser
    ({}, '{"latency_budget": 0.8}'),                                       # no target: MiprunOptions
    ({"keep": 0.5, "method": "last", "protect": "99"}, '{"protect": "first,last"}'),  # by the plan
])
def test_python_api_path_raises_option_error_before_engine(tiny_llama_dir, tmp_path, config, entry):
    """`LLM(...)` reaches the plan through `create_engine_config`: the refusal is the same
    `OptionError`, and its hint is the `model_loader_extra_config` entry a script can paste,
    not a `vllm serve` flag."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_miprun

    vllm_miprun.register()
    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun",
                      model_loader_extra_config={**config, "cache_dir": str(tmp_path)})
    with pytest.raises(OptionError) as err:
        args.create_engine_config()
    assert f"e.g. model_loader_extra_config={entry}" in str(err.value), str(err.value)
    assert "--miprun-" not in str(err.value), str(err.value)


def test_the_users_hf_overrides_stay_and_the_plans_fields_win(tiny_llama_dir):
    """rope_theta is the user's; num_hidden_layers is the plan's, whatever the user gave."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_miprun.vllm.engine_args import prepare_engine_args

    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun",
                      model_loader_extra_config={"keep": 0.5, "method": "last"},
                      hf_overrides={"rope_theta": 123.0, "num_hidden_layers": 8})
    prepare_engine_args(args)
    assert args.hf_overrides["rope_theta"] == 123.0
    assert args.hf_overrides["num_hidden_layers"] == 4 and args.hf_overrides[remap.KEPT_FIELD] == [0, 1, 2, 7]


def test_a_callable_hf_overrides_is_refused_in_one_line(tiny_llama_dir):
    """The pruned fields cannot be merged into a function: refused, not a TypeError."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_miprun.vllm.engine_args import prepare_engine_args

    args = EngineArgs(model=str(tiny_llama_dir), load_format="miprun",
                      model_loader_extra_config={"keep": 0.5, "method": "last"}, hf_overrides=lambda config: config)
    with pytest.raises(OptionError, match="callable hf_overrides"):
        prepare_engine_args(args)


def test_model_hash_tells_kept_sets_of_equal_size_apart(tiny_llama_dir):
    """vLLM's compile-cache key (ModelConfig.compute_hash) covers miprun_kept_layers."""
    import json

    from vllm.config import ModelConfig

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    hashes = {
        tuple(kept): ModelConfig(model=str(tiny_llama_dir),
                                 hf_overrides=remap.config_overrides(config, kept)).compute_hash()
        for kept in ([0, 1, 2, 7], [0, 3, 5, 7])
    }
    full = ModelConfig(model=str(tiny_llama_dir)).compute_hash()
    assert len(set(hashes.values()) | {full}) == 3


@pytest.fixture(scope="module")
def foreign_cache(tiny_llama_dir, tmp_path_factory):
    """A valid score cache for other weights: a second tiny model with another seed."""
    from tiny_models import make_tiny_model
    from vllm_miprun.pipeline.calibrate import calibrate
    from vllm_miprun.options import CalibrationSettings

    other = make_tiny_model(tmp_path_factory.mktemp("other-weights"), seed=1)
    result = calibrate(other, CalibrationSettings(samples=4, seq_len=32),
                       cache_dir=tmp_path_factory.mktemp("scores"), progress=False)
    return result.path


def _exit_message(parser, model_dir, *flags) -> str:
    with pytest.raises(SystemExit) as exit_:
        _engine_args(parser, "--model", str(model_dir), *flags)
    message = str(exit_.value.code)
    assert message.startswith("vllm-miprun: error: ")
    return message


def test_cache_for_other_weights_exits_with_one_line(serve_parser, tiny_llama_dir, foreign_cache):
    message = _exit_message(serve_parser, tiny_llama_dir, "--miprun-keep", "0.75", "--miprun-scores", str(foreign_cache))
    assert "belongs to other weights" in message


def test_a_malformed_config_json_exits_with_one_line(serve_parser, tiny_llama_dir, tmp_path):
    """A JSONDecodeError is no MiprunError, but still the user's file: no traceback."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "config.json").write_text("{")
    _exit_message(serve_parser, broken, *FLAGS_HALF)


def test_missing_cache_with_require_cache_exits_with_one_line(serve_parser, tiny_llama_dir, tmp_path):
    message = _exit_message(serve_parser, tiny_llama_dir, "--miprun-keep", "0.75", "--miprun-require-cache",
                            "--model-loader-extra-config", f'{{"cache_dir": "{tmp_path}"}}')
    assert "require_cache is set" in message and "vllm-miprun calibrate" in message


# --- vllm-miprun export: every MiprunError is one line and exit status 2 -----------------


def _export_exit(capsys, *argv) -> str:
    from vllm_miprun.tools import cli

    assert cli.main(["export", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-miprun export: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_export_with_a_missing_cache_exits_2(tiny_llama_dir, tmp_path, capsys):
    err = _export_exit(capsys, tiny_llama_dir, tmp_path / "out", "--keep", "0.75", "--require-cache",
                       "--cache-dir", tmp_path / "scores")
    assert "require_cache is set" in err and not (tmp_path / "out").exists()


def test_export_with_a_cache_for_other_weights_exits_2(tiny_llama_dir, foreign_cache, tmp_path, capsys):
    err = _export_exit(capsys, tiny_llama_dir, tmp_path / "out", "--keep", "0.75", "--scores", foreign_cache)
    assert "belongs to other weights" in err and not (tmp_path / "out").exists()


def test_export_of_a_folder_without_safetensors_exits_2(tiny_llama_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    err = _export_exit(capsys, folder, tmp_path / "out", "--drop", "3-4")
    assert "holds no *.safetensors files" in err and not (tmp_path / "out").exists()
    err = _export_exit(capsys, tmp_path / "missing", tmp_path / "out", "--keep", "0.5", "--method", "last")
    assert "has no config.json" in err


def test_export_with_drop_writes_the_kept_blocks(tiny_llama_dir, tmp_path, capsys):
    import json

    from vllm_miprun.tools import cli

    assert cli.main(["export", str(tiny_llama_dir), str(tmp_path / "out"), "--drop", "0,6-7"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[remap.KEPT_FIELD] == [1, 2, 3, 4, 5] and config["num_hidden_layers"] == 5
    assert json.loads((tmp_path / "out" / "miprun_plan.json").read_text())["method"] == "drop"
