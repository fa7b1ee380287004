"""A damaged safetensors shard is refused in one line that names it, before anything reads it.

Each case damages a copy of the tiny model's one shard the way a disk, a cut download or a
bad writer does, and goes through the one checkpoint reader (``checkpoint.read_shard_header``)
by every road that reaches it: the fingerprint, the offline CLI, and ``vllm serve``'s front
process (its argument-to-engine-args step, which plans before any engine exists).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from vllm_miprun.errors import ModelFolderError
from vllm_miprun.model import checkpoint
from vllm_miprun.model.fingerprint import model_fingerprint


def _shard(folder: Path) -> Path:
    (shard,) = folder.glob("*.safetensors")
    return shard


def _split(shard: Path) -> tuple[bytes, dict, bytes]:
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + length], json.loads(raw[8:8 + length]), raw[8 + length:]


def _rewrite_header(shard: Path, edit) -> None:
    _, header, data = _split(shard)
    text = edit(header)
    text = text if isinstance(text, str) else json.dumps(header)
    shard.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _garbage_length(shard: Path) -> None:
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _cut_header(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:100])


def _truncated_data(shard: Path) -> None:
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])


def _padded_data(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes() + b"\0" * 16)


def _offsets_past_the_end(shard: Path) -> None:
    def edit(header):
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 4096, end + 4096]
    _rewrite_header(shard, edit)


def _shape_disagrees_with_bytes(shard: Path) -> None:
    def edit(header):
        header[_first_tensor(header)]["shape"][0] += 1
    _rewrite_header(shard, edit)


def _garbled_entry(shard: Path) -> None:
    def edit(header):
        name = _first_tensor(header)
        header[name]["dtype"] = ["F32"]
        header[name]["shape"] = [10**400]
    _rewrite_header(shard, edit)


def _header_not_json(shard: Path) -> None:
    header_bytes, _, data = _split(shard)
    text = b"{" + b"x" * (len(header_bytes) - 1)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _duplicate_tensor_name(shard: Path) -> None:
    def edit(header):
        name = _first_tensor(header)
        body = json.dumps(header)
        return body[:-1] + f', "{name}": {json.dumps(header[name])}}}'
    _rewrite_header(shard, edit)


DAMAGES = {
    "garbage header length": (_garbage_length, "header length field says 4611686018427387904"),
    "header cut short": (_cut_header, "header length field says"),
    "truncated data section": (_truncated_data, "(truncated)"),
    "trailing bytes": (_padded_data, "truncated or padded"),
    "offsets past the end": (_offsets_past_the_end, "(truncated)"),
    "shape disagrees with bytes": (_shape_disagrees_with_bytes, "bits but its data_offsets span"),
    "garbled tensor entry": (_garbled_entry, "has no valid dtype, shape and data_offsets"),
    "header not JSON": (_header_not_json, "header is not valid JSON"),
    "duplicate tensor name": (_duplicate_tensor_name, "appears more than once"),
}


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, tiny_llama_dir, tmp_path) -> tuple[Path, Path, str]:
    """(model folder, its damaged shard, the expected words) for each kind of damage."""
    folder = tmp_path / "damaged-model"
    shutil.copytree(tiny_llama_dir, folder)
    damage, words = DAMAGES[request.param]
    shard = _shard(folder)
    damage(shard)
    return folder, shard, words


def test_intact_shard_passes_and_keeps_its_fingerprint(tiny_llama_dir, tmp_path):
    header_bytes, header = checkpoint.read_shard_header(_shard(tiny_llama_dir))
    assert header and "__metadata__" not in header and header_bytes.startswith(b"{")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_llama_dir)


def test_every_reader_refuses_a_damaged_shard_in_one_line(damaged):
    folder, shard, words = damaged
    for read in (lambda: checkpoint.read_header(shard), lambda: model_fingerprint(folder),
                 lambda: checkpoint.tensor_names(folder), lambda: checkpoint.check_shards(folder)):
        with pytest.raises(ModelFolderError) as err:
            read()
        message = str(err.value)
        assert str(shard) in message and "damaged" in message and words in message, message
        assert "\n" not in message


def test_offline_cli_exits_2_with_one_line(damaged, tmp_path, capsys):
    from vllm_miprun.tools import cli

    folder, shard, words = damaged
    for argv in (["export", folder, tmp_path / "out", "--drop", "3-4"],
                 ["calibrate", folder, "--cache-dir", tmp_path / "scores"]):
        assert cli.main(list(map(str, argv))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(shard) in err and words in err, err
    assert not (tmp_path / "out").exists() and not list((tmp_path / "scores").glob("*.json"))




@pytest.mark.parametrize("flags", [["--miprun-drop", "3-4"], ["--miprun-keep", "0.5", "--miprun-method", "last"]])
def test_serve_front_refuses_before_any_engine(serve_parser, damaged, flags):
    """Plans that never fingerprint (a drop list, a score-free method) refuse it too."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    folder, shard, words = damaged
    with pytest.raises(SystemExit) as exit_:
        AsyncEngineArgs.from_cli_args(serve_parser.parse_args(["--model", str(folder), *flags]))
    message = str(exit_.value.code)
    assert message.startswith("vllm-miprun: error: safetensors file ") and str(shard) in message
    assert words in message and "\n" not in message


# Hand-made shards for header checks a mutation pass found unexercised; each fails with its
# check removed or its size changed.


def _handmade(folder: Path, tensors: dict, data_bytes: int) -> Path:
    folder.mkdir()
    header = json.dumps(tensors).encode()
    shard = folder / "model.safetensors"
    shard.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_bytes))
    return shard


@pytest.mark.parametrize("tensors, data_bytes, why", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "starts at byte 4"),  # overlap
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, 1, "needs 12 bits"),         # half a byte
    ({"a": {"dtype": "F32", "shape": [1] * 33, "data_offsets": [0, 4]}}, 4, "no valid dtype"),  # 33 dimensions
    ({"a": {"dtype": "F32", "shape": [True, 1], "data_offsets": [0, 4]}}, 4, "no valid dtype"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, 4, "no valid dtype"),
])
def test_a_hand_made_damaged_header_is_refused(tmp_path, tensors, data_bytes, why):
    shard = _handmade(tmp_path / "m", tensors, data_bytes)
    with pytest.raises(ModelFolderError, match=f"{shard} is damaged: .*{why}"):
        checkpoint.read_shard_header(shard)


@pytest.mark.parametrize("dtype, shape, data_bytes", [("F6_E2M3", [4], 3), ("F6_E3M2", [8], 6), ("F4", [4], 2),
                                                       ("F32", [1] * 32, 4)])
def test_packed_and_many_dimensioned_tensors_are_sized_as_safetensors_sizes_them(tmp_path, dtype, shape, data_bytes):
    tensors = {"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, data_bytes]}}
    shard = _handmade(tmp_path / "m", tensors, data_bytes)
    assert checkpoint.read_shard_header(shard)[1] == tensors


DEEP = "[" * 100_000 + "]" * 100_000  # json raises RecursionError, not a ValueError


@pytest.mark.parametrize("text, why", [("{", "cannot be read as JSON"), (DEEP, "cannot be read as JSON"),
                                       ("[1]", "holds a JSON list, not an object"),
                                       (b'{"a": "\xff"}', "cannot be read as JSON")])
def test_a_damaged_config_json_is_refused_naming_it(tiny_llama_dir, tmp_path, text, why):
    """It used to escape as a bare JSON error naming no file, a RecursionError, or an
    AttributeError of the first reader that called .get on a list."""
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelFolderError, match=why) as err:
        checkpoint.read_config(folder)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": []}, {"weight_map": None},
                                   {"weight_map": {"model.norm.weight": 5}}, {"weight_map": {"a": [1]}}, [], DEEP])
def test_a_damaged_safetensors_index_is_refused_naming_it(tiny_llama_dir, tmp_path, index):
    """Each reader of the index used to fail its own way: KeyError, AttributeError,
    TypeError (a shard named by a number or a list), RecursionError."""
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (folder / checkpoint.INDEX_NAME).write_text(index if isinstance(index, str) else json.dumps(index))
    for reader in (checkpoint.safetensors_files, checkpoint.missing_shards, checkpoint.tensor_names):
        with pytest.raises(ModelFolderError, match=checkpoint.INDEX_NAME):
            reader(folder)


def test_a_bad_weight_map_entry_is_named(tiny_llama_dir, tmp_path):
    """Among many good entries, the one that is not a shard file name is the one shown."""
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weight_map = {f"model.layers.{i}.w": "model-00001-of-00002.safetensors" for i in range(20)}
    (folder / checkpoint.INDEX_NAME).write_text(json.dumps({"weight_map": {**weight_map, "lm_head.weight": 5}}))
    with pytest.raises(ModelFolderError, match=r"weight_map gives 'lm_head.weight' -> 5, not a shard file name"):
        checkpoint.read_weight_map(folder)


@pytest.mark.parametrize("field, value, error, message", [
    ("num_hidden_layers", 10**30, "OptionError", r"num_hidden_layers as a positive integer, got 10+ \(at most 10+\)"),
    ("quantization_config", True, "UnsupportedQuantizationError", "quantization_config=True"),  # AttributeError
    ("hidden_size", None, "ModelFolderError", r"config.json: model config lacks .hidden_size."),  # TypeError
    ("vocab_size", 10**50, "ModelFolderError", r"'vocab_size' must be a positive integer, got 10+ \(at most 2\*\*40\)"),
])
def test_config_values_no_model_has_are_refused_before_planning(tiny_llama_dir, tmp_path, field, value, error, message):
    """Were: a hang over 10**30 blocks, AttributeError, TypeError, OverflowError. Each is a MiprunError
    (what `LLM(...)` raises), so a plain ValueError would not do."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message) as err:
        make_plan(folder, MiprunOptions.from_dict({"drop": "1", "cache_dir": str(tmp_path / "c")}), progress=False)
    assert type(err.value).__name__ == error
