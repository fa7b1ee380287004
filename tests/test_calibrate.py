"""Block-by-block calibration on tiny seeded models: exactness, memory behaviour, caching, CLI."""

from __future__ import annotations

import json
import math
import os
import time
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from vllm_miprun.tools import cli
from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.model.checkpoint import ModelFolderError
from vllm_miprun.pipeline.calibrate import calibrate, calibration_ids
from vllm_miprun.pipeline.store import read_cache
from vllm_miprun.model.fingerprint import model_fingerprint
from vllm_miprun.options import CalibrationSettings

SMALL = CalibrationSettings(samples=4, seq_len=32)


def test_blockwise_matches_a_full_forward(tiny_llama_dir):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.inference_mode():
        reference = full(ids, output_hidden_states=True)
    model = BlockwiseModel(tiny_llama_dir)
    hidden = model.embed_tokens(ids)
    torch.testing.assert_close(hidden, reference.hidden_states[0])
    for index in range(model.num_blocks - 1):  # HF's last hidden state is after the final norm
        with model.block(index) as layer:
            hidden = model.run_block(layer, hidden)
        torch.testing.assert_close(hidden, reference.hidden_states[index + 1], rtol=1e-4, atol=1e-5)
    with model.block(model.num_blocks - 1) as layer:
        hidden = model.run_block(layer, hidden)
    logits = model.norm(hidden) @ model.lm_head_weight.T
    torch.testing.assert_close(logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_blocks_are_read_one_at_a_time(tiny_llama_dir):
    model = BlockwiseModel(tiny_llama_dir)
    resident = lambda: sum(p.numel() for p in model.skeleton.model.layers.parameters() if not p.is_meta)  # noqa: E731
    assert resident() == 0
    with model.block(3):
        one_block = resident()
        assert one_block > 0
    assert resident() == 0
    assert model.blocks_loaded == 1


def test_calibrate_writes_then_reuses(tiny_llama_dir, tmp_path):
    first = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    assert not first.reused
    cache = first.cache
    assert cache.num_blocks == 8 and len(cache.block_scores) == 8
    assert len(cache.span_scores) == 9 and all(len(row) == 9 for row in cache.span_scores)
    assert all(cache.span_scores[i][j] is None for i in range(9) for j in range(9) if i >= j)
    assert all(math.isfinite(cache.span_scores[i][j]) for i in range(9) for j in range(i + 1, 9))
    assert cache.block_scores[2] == cache.span_scores[2][3]
    assert len(cache.baselines["block_influence"]) == 8
    mtime = first.path.stat().st_mtime_ns
    second = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    assert second.reused and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    other_seed = calibrate(tiny_llama_dir, CalibrationSettings(samples=4, seq_len=32, seed=1),
                           cache_dir=tmp_path, progress=False)
    other_set = calibrate(tiny_llama_dir, CalibrationSettings(samples=4, seq_len=32, dataset="c4"),
                          cache_dir=tmp_path, progress=False)
    assert len({first.path, other_seed.path, other_set.path}) == 3
    assert other_seed.cache.block_scores != cache.block_scores


def test_fingerprint_follows_weights_not_path(tiny_llama_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_llama_dir)
    tensors = load_file(copy / "model.safetensors")
    name = "model.layers.5.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.5  # same shapes, different weights
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(copy) != model_fingerprint(tiny_llama_dir)


def test_fingerprint_is_read_once_per_process_until_a_file_changes(tiny_llama_dir, tmp_path, monkeypatch):
    """One start asks several times (cached plan? plan, heal, metrics); the samples are read once,
    and again after any write to a shard, even one that keeps its size and its mtime. A folder
    written in the last two seconds is read every time: a timestamp tick may hide a write."""
    from vllm_miprun.model import fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    reads = []
    real_read = fingerprint._hash_safetensors_file
    monkeypatch.setattr(fingerprint, "_hash_safetensors_file", lambda *args: reads.append(1) or real_read(*args))
    first = model_fingerprint(copy)
    assert model_fingerprint(copy) == first and len(reads) == 2  # just written: not kept
    monkeypatch.setattr(fingerprint, "RACY_NS", 0)  # as if the folder were old
    assert model_fingerprint(copy) == first and model_fingerprint(copy) == first and len(reads) == 3
    shard = copy / "model.safetensors"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte: sampled
    time.sleep(0.05)  # past any timestamp tick, so the write shows in ctime
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime as before
    assert model_fingerprint(copy) != first and len(reads) == 4


def _fingerprint_after(folder, change) -> str:
    """The fingerprint of a one-file model whose tensors ``change`` edits (a dict, in place)."""
    tensors = {"a.weight": torch.arange(4096, dtype=torch.float32),  # 16 KiB: longer than two samples
               "z.weight": torch.arange(3000, dtype=torch.float32)}  # the file's last bytes
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}
    change(tensors, config)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return model_fingerprint(folder)


def _edit(name, index, value):
    def change(tensors, config):
        tensors[name][index] = value
    return change


def test_fingerprint_reads_the_config_the_header_and_each_tensors_head_and_tail(tmp_path):
    """What the docstring promises: config.json, every header and the first and last 4 KiB of
    every tensor are read; the bytes between the samples are not."""
    same = _fingerprint_after(tmp_path / "same", lambda tensors, config: None)

    def rename(tensors, config):
        tensors["b.weight"] = tensors.pop("a.weight")

    changed = {
        "config": lambda tensors, config: config.update(rope_theta=1e6),
        "a tensor's name": rename,
        "a tensor's first element": _edit("a.weight", 0, -1.0),
        "a tensor's last element": _edit("a.weight", -1, -1.0),
        "the file's last element": _edit("z.weight", -1, -1.0),
    }
    for what, change in changed.items():
        assert _fingerprint_after(tmp_path / what, change) != same, what
    assert _fingerprint_after(tmp_path / "middle", _edit("a.weight", 2048, -1.0)) == same  # not sampled


def test_changed_weights_never_reuse_the_cache(tiny_llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    first = calibrate(model, SMALL, cache_dir=tmp_path / "c", progress=False)
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    second = calibrate(model, SMALL, cache_dir=tmp_path / "c", progress=False)
    assert not second.reused and second.path != first.path


def test_calibration_ce_sees_pruning(tiny_llama_dir):
    from vllm_miprun.pipeline.refine import CalibrationCE

    evaluate = CalibrationCE(BlockwiseModel(tiny_llama_dir, resident_blocks=True), calibration_ids(tiny_llama_dir, SMALL)[:2])
    dense = evaluate(frozenset())
    assert math.isfinite(dense)
    assert evaluate(frozenset({2, 3})) != pytest.approx(dense)
    assert evaluate(frozenset()) == pytest.approx(dense)


def test_model_folder_without_safetensors_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "nosafe"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelFolderError, match="no \\*.safetensors"):
        calibrate(folder, SMALL, cache_dir=tmp_path, progress=False)


def test_missing_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "notok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    with pytest.raises(ModelFolderError, match="no usable tokenizer"):
        calibrate(folder, SMALL, cache_dir=tmp_path / "c", progress=False)


def test_cli_calibrate_and_scores_json(tiny_llama_dir, tmp_path, capsys):
    args = [str(tiny_llama_dir), "--samples", "4", "--seq-len", "32", "--cache-dir", str(tmp_path)]
    assert cli.main(["scores", *args, "--json"]) == 2
    assert "vllm-miprun calibrate" in capsys.readouterr().err
    assert cli.main(["calibrate", *args]) == 0
    out = capsys.readouterr().out
    assert "wrote score cache" in out and out.count("\n") > 8
    assert cli.main(["scores", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_blocks"] == 8 and len(data["block_scores"]) == 8
    assert data["span_scores"][3][1] is None and isinstance(data["span_scores"][1][3], float)
    assert data["fingerprint"].startswith("sha256:")
    assert data["calibration"]["samples"] == 4 and data["calibration"]["seq_len"] == 32


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "samples must be an integer >= 1"),
    (["--estimator", "knn"], "invalid choice"),
])
def test_cli_rejects_bad_settings(tiny_llama_dir, tmp_path, capsys, argv, message):
    try:
        code = cli.main(["calibrate", str(tiny_llama_dir), "--cache-dir", str(tmp_path), *argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_compute_dtype_follows_the_device_and_the_dtype_option(tiny_llama_dir, tmp_path):
    model = tmp_path / "bf16"
    shutil.copytree(tiny_llama_dir, model)
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(model / "model.safetensors").items()}
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    on_cpu = BlockwiseModel(model)
    assert on_cpu.dtype == torch.float32  # CPU: float32, as the caches before the option
    with on_cpu.block(0) as layer:
        assert layer.mlp.down_proj.weight.dtype == torch.float32
    cache = calibrate(model, SMALL, cache_dir=tmp_path / "c32", progress=False).cache
    assert cache.model["compute_dtype"] == "float32"
    half = calibrate(model, SMALL, cache_dir=tmp_path / "c16", progress=False, dtype=torch.bfloat16).cache
    assert half.model["compute_dtype"] == "bfloat16"
    assert half.block_scores != cache.block_scores  # the blocks really ran in bfloat16


# --- the compute (device type, dtype) is part of the cache key -------------------------------

def test_compute_identity_names_device_and_dtype(tiny_llama_dir, tmp_path):
    from vllm_miprun.pipeline.calibrate import LEGACY_COMPUTE, compute_identity

    assert compute_identity(tiny_llama_dir, "cpu") == LEGACY_COMPUTE == "cpu-float32"
    assert compute_identity(tiny_llama_dir, "cuda") == "cuda-float32"  # the stored dtype on a GPU
    assert compute_identity(tiny_llama_dir, "cuda", torch.bfloat16) == "cuda-bfloat16"
    bf16 = tmp_path / "bf16"  # a hub snapshot fetched in part: its config says the dtype
    bf16.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    (bf16 / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    assert compute_identity(bf16, "cuda") == "cuda-bfloat16"


def test_gpu_and_cpu_scores_never_share_a_cache_entry(tiny_llama_dir, tmp_path):
    from vllm_miprun.pipeline.calibrate import calibration_key, locate

    cpu_path, _ = locate(tiny_llama_dir, SMALL, tmp_path, "cpu-float32")
    gpu_path, _ = locate(tiny_llama_dir, SMALL, tmp_path, "cuda-bfloat16")
    assert cpu_path != gpu_path
    assert "compute" not in calibration_key(SMALL)  # the CPU key keeps its old form: old caches read
    assert calibration_key(SMALL, "cuda-bfloat16")["compute"] == "cuda-bfloat16"


def test_a_cache_of_another_dtype_under_the_cpu_key_is_refused(tiny_llama_dir, tmp_path):
    """An older release filed GPU (bfloat16) scores under the same key as CPU ones: the
    CPU run refuses them in one line instead of planning from them."""
    from vllm_miprun.pipeline import store

    first = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    assert first.cache.model["compute_dtype"] == "float32" and first.cache.model["compute_device"] == "cpu"
    data = json.loads(first.path.read_text())
    data["model"]["compute_dtype"] = "bfloat16"
    first.path.write_text(json.dumps(data))
    with pytest.raises(store.CacheError, match="calibrated in bfloat16, this run calibrates in float32 on cpu"):
        calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    # a plan reads the cache without calibrating: the same check
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    options = MiprunOptions.from_dict({"keep": 0.5, "method": "shortgpt", "samples": SMALL.samples,
                                       "seq_len": SMALL.seq_len, "device": "cpu", "cache_dir": str(tmp_path)})
    with pytest.raises(store.CacheError, match="calibrated in bfloat16, this run calibrates in float32 on cpu"):
        make_plan(tiny_llama_dir, options, progress=False)


def test_a_cpu_calibration_in_another_dtype_gets_its_own_cache_entry(tiny_llama_dir, tmp_path):
    """A float32 and a bfloat16 CPU pass differ in the last bits: the second, in the same cache
    folder, calibrates again instead of handing back the float32 scores."""
    first = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    half = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False, dtype=torch.bfloat16)
    assert not half.reused and half.path != first.path
    assert half.cache.model["compute_dtype"] == "bfloat16"
    again = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False, dtype=torch.bfloat16)
    assert again.reused and again.path == half.path


def test_force_calibrates_again_over_an_existing_cache(tiny_llama_dir, tmp_path):
    first = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False)
    assert not first.reused
    assert calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False).reused
    forced = calibrate(tiny_llama_dir, SMALL, cache_dir=tmp_path, progress=False, force=True)
    assert not forced.reused and forced.path == first.path


def test_boundary_stats_keep_each_sequences_last_token_and_never_position_zero(tiny_llama_dir):
    """What the angular distance and the MI estimator read at each boundary: the last token of
    every sequence, and seeded token rows that skip the attention sink at position 0."""
    from vllm_miprun.core import scoring
    from vllm_miprun.pipeline.calibrate import _mi_rows, collect_boundary_stats

    samples, seq_len = 3, 10
    rows = _mi_rows(samples, seq_len, 1000, seed=0)  # more than there are: every row but position 0
    assert rows.tolist() == [r for r in range(samples * seq_len) if r % seq_len != 0]
    some = _mi_rows(samples, seq_len, 7, seed=3)
    assert len(some) == 7 and all(r % seq_len for r in some.tolist()) and torch.equal(some, some.sort().values)
    assert torch.equal(some, _mi_rows(samples, seq_len, 7, seed=3))

    model = BlockwiseModel(tiny_llama_dir)
    ids = torch.randint(3, 500, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    stats = collect_boundary_stats(model, ids, 1000, seed=0, progress=False)
    hidden = model.embed_tokens(ids)
    torch.testing.assert_close(stats.last_tokens[0], hidden[:, -1].float())
    torch.testing.assert_close(stats.mi_states[0], hidden.flatten(0, 1)[rows].float())
    with model.block(0) as layer:
        after = model.run_block(layer, hidden)
    torch.testing.assert_close(stats.last_tokens[1], after[:, -1].float())
    influence = 1.0 - scoring.mean_cosine(hidden.flatten(0, 1), after.flatten(0, 1))
    assert stats.block_influence[0] == pytest.approx(influence)
    assert len(stats.last_tokens) == len(stats.mi_states) == model.num_blocks + 1 == len(stats.block_influence) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_influence_cosine_is_the_float64_mean_over_every_row(dtype):
    """ShortGPT's mean cosine, taken in chunks of rows, against numpy's float64 on the same
    inputs: every row counts once (the last, partial chunk included), in float64 whatever
    the states' dtype."""
    import numpy as np

    from vllm_miprun.core import scoring

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 64, generator=generator).to(dtype)
    b = (a.float() + 0.5 * torch.randn(1000, 64, generator=generator)).to(dtype)
    b[-7:] = -a[-7:]  # the partial last chunk points the other way: dropping it would show
    x, y = a.double().numpy(), b.double().numpy()
    expected = float(np.mean((x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))))
    for rows in (256, 1000, 3):
        assert abs(scoring.mean_cosine(a, b, rows=rows) - expected) <= 1e-12
