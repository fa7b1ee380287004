"""Fast tests of the speed profile: fitting (core/profile_fit), the speed sidecar
(pipeline/speed_store), the `vllm-miprun profile` command (tools/profiling) and the
shared harness's process-group runner (no engine)."""

from __future__ import annotations

import json
import math

import pytest

from vllm_miprun.core import profile_fit
from vllm_miprun.core.gains import exact_kv_memory
from vllm_miprun.core.latency import LatencyModel, kv_bytes_per_token_per_block
from vllm_miprun.pipeline import speed_store
from vllm_miprun.pipeline.calibrate import CalibrationSettings, calibrate
from vllm_miprun.tools import profiling as profile

SMOL = {  # SmolLM2-135M's config.json, the fields the cost model reads
    "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "num_hidden_layers": 30,
}


def test_fit_recovers_exact_line():
    points = [(k, 0.004 + k * 0.0005) for k in (30, 23, 15)]
    fit = profile_fit.fit_fixed_and_block(points)
    assert fit["fixed_s"] == pytest.approx(0.004)
    assert fit["block_s"] == pytest.approx(0.0005)
    assert fit["residual_rms_s"] == pytest.approx(0.0, abs=1e-12)
    assert fit["clamped"] is None


def test_fit_two_points_is_exact_and_least_squares_with_noise():
    fit = profile_fit.fit_fixed_and_block([(30, 0.020), (15, 0.012)])
    assert fit["block_s"] == pytest.approx(0.008 / 15)
    assert fit["fixed_s"] == pytest.approx(0.012 - 15 * 0.008 / 15)
    noisy = profile_fit.fit_fixed_and_block([(30, 0.0201), (23, 0.0160), (15, 0.0119)])
    assert 0.0004 < noisy["block_s"] < 0.0006
    residuals = [s - noisy["fixed_s"] - noisy["block_s"] * k for k, s in [(30, 0.0201), (23, 0.0160), (15, 0.0119)]]
    assert noisy["residual_rms_s"] == pytest.approx(math.sqrt(sum(r * r for r in residuals) / 3))
    assert noisy["residual_rms_s"] > 0


def test_fit_clamps_negative_costs():
    through_origin = profile_fit.fit_fixed_and_block([(30, 0.030), (15, 0.010)])  # fixed would be < 0
    assert through_origin["fixed_s"] == 0.0
    assert through_origin["block_s"] == pytest.approx((30 * 0.030 + 15 * 0.010) / (30**2 + 15**2))  # least squares
    assert "fixed_s<0" in through_origin["clamped"]
    flat = profile_fit.fit_fixed_and_block([(30, 0.010), (15, 0.011)])  # slope would be < 0
    assert flat["block_s"] == 0.0 and flat["fixed_s"] == pytest.approx(0.0105)


@pytest.mark.parametrize("points", [[(30, 0.01)], [(30, 0.01), (30, 0.02)], [(30, -0.01), (15, 0.01)],
                                    [(30, float("nan")), (15, 0.01)], [(30, 0.02), (15, float("inf"))]])
def test_fit_rejects_unidentifiable_or_bad_points(points):
    with pytest.raises(ValueError):
        profile_fit.fit_fixed_and_block(points)


def test_make_profile_round_trips_through_latency_model():
    prof = profile_fit.make_profile(30, 16, [(30, 0.019), (15, 0.011)], measured={"device": "test"})
    assert prof["source"] == "profile" and len(prof["block_s"]) == 30
    assert json.loads(json.dumps(prof)) == prof  # plain JSON
    model = LatencyModel.from_profile(prof)
    assert model.batch_size == 16 and model.source == "profile"
    assert model.full_s == pytest.approx(0.019)
    assert model.predict(range(15)) == pytest.approx(0.011)
    assert model.speedup(range(15)) == pytest.approx(0.019 / 0.011)
    assert model.details["measured"]["device"] == "test"


def test_decode_seconds_per_token():
    assert profile_fit.decode_seconds_per_token(1.27, 0.02, 126) == pytest.approx(0.01)
    assert profile_fit.decode_seconds_per_token(0.01, 0.02, 8) == 0.0  # noise never goes negative
    with pytest.raises(ValueError):
        profile_fit.decode_seconds_per_token(1.0, 0.5, 1)


def test_exact_kv_memory_gives_exact_capacity_ratio():
    per_layer = kv_bytes_per_token_per_block(SMOL, 2)
    assert per_layer == 2 * 3 * 64 * 2
    mem = exact_kv_memory(SMOL, 2, kept=23, at_least=256 * 2**20)
    assert mem >= 256 * 2**20
    page = per_layer * 128
    full_pages, pruned_pages = mem // (page * 30), mem // (page * 23)
    assert mem % (page * 30) == 0 and mem % (page * 23) == 0
    assert pruned_pages / full_pages == pytest.approx(30 / 23, rel=0, abs=1e-15)


def test_weight_bytes_counts_kept_blocks(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {
        "model.embed_tokens.weight": torch.zeros(10, 4, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(4, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert profile.weight_bytes(tmp_path, None) == (40 + 16 + 16 + 4) * 2
    assert profile.weight_bytes(tmp_path, [1]) == (40 + 16 + 4) * 2
    assert profile.weight_bytes(tmp_path, [1], dtype_bytes=4) == (40 + 16 + 4) * 4


def test_store_and_read_speed_sidecar(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**SMOL, "num_hidden_layers": 2, "architectures": ["LlamaForCausalLM"]}))
    save_file({"model.norm.weight": torch.ones(4)}, model / "model.safetensors")
    cache_dir = tmp_path / "cache"
    assert speed_store.read_profile(model, cache_dir) is None
    prof = profile_fit.make_profile(2, 1, [(2, 0.003), (1, 0.002)])
    written = speed_store.store_speed(model, cache_dir, profile=prof)
    assert written == [str(speed_store.speed_path(model, cache_dir))]
    assert speed_store.read_profile(model, cache_dir) == prof
    speed_store.store_speed(model, cache_dir, throughput={"tokens_per_s": 10.0})
    data = speed_store.read_speed(model, cache_dir)
    assert data["profile"] == prof and data["throughput"]["tokens_per_s"] == 10.0
    save_file({"model.norm.weight": torch.zeros(4)}, model / "model.safetensors")  # new weights
    assert speed_store.read_profile(model, cache_dir) is None


def test_a_sidecar_profile_that_does_not_parse_is_not_read(tiny_llama_dir, tmp_path):
    """Planning then falls back to the estimate instead of failing on it."""
    speed_store.store_speed(tiny_llama_dir, tmp_path, throughput={"tokens_per_s": 10.0, "batch_size": 1})
    path = speed_store.speed_path(tiny_llama_dir, tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "profile": {"batch_size": 1, "fixed_s": 0.1, "block_s": "fast"}}))
    assert speed_store.read_speed(tiny_llama_dir, tmp_path)["profile"]["block_s"] == "fast"
    assert speed_store.read_profile(tiny_llama_dir, tmp_path) is None


@pytest.mark.parametrize("profile, words", [({"batch_size": 1, "fixed_s": 0.1, "block_s": "fast"}, "must be a list"),
                                            ({"batch_size": 1, "fixed_s": 0.1, "block_s": [0.01] * 3},
                                             "gives 3 block costs, the model has 8 blocks")])
def test_a_profile_that_is_not_this_models_is_refused_before_anything_is_written(tiny_llama_dir, tmp_path,
                                                                                 profile, words):
    """Stored in the score caches, it would make each of them unreadable."""
    calibrate(tiny_llama_dir, CalibrationSettings(samples=2, seq_len=16), cache_dir=tmp_path, progress=False)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=words):
        speed_store.store_speed(tiny_llama_dir, tmp_path, profile=profile)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,  # json raises RecursionError
                                  '{"profile": {"batch_size": 1, "fixed_s": 0.1, "block_s": null}}'])
def test_a_sidecar_that_does_not_parse_is_not_read_and_is_rewritten(tiny_llama_dir, tmp_path, text):
    path = speed_store.speed_path(tiny_llama_dir, tmp_path)
    path.write_text(text)
    assert speed_store.read_profile(tiny_llama_dir, tmp_path) is None
    assert speed_store.read_speed(tiny_llama_dir, tmp_path) is None
    speed_store.store_speed(tiny_llama_dir, tmp_path, throughput={"tokens_per_s": 10.0, "batch_size": 1})
    assert speed_store.read_speed(tiny_llama_dir, tmp_path)["throughput"]["tokens_per_s"] == 10.0


def test_store_speed_writes_the_profile_into_the_score_caches_of_these_weights_only(tiny_llama_dir, tiny_qwen2_dir,
                                                                                      tmp_path):
    """Two models in folders of the same name share a cache-file prefix; only this model's cache changes."""
    import shutil

    from vllm_miprun.options import CalibrationSettings
    from vllm_miprun.pipeline import store
    from vllm_miprun.pipeline.calibrate import calibrate

    cache_dir, settings = tmp_path / "scores", CalibrationSettings(samples=2, seq_len=16)
    mine, other = shutil.copytree(tiny_llama_dir, tmp_path / "a" / "m"), shutil.copytree(tiny_qwen2_dir,
                                                                                           tmp_path / "b" / "m")
    own = calibrate(mine, settings, cache_dir=cache_dir, progress=False).path
    foreign = calibrate(other, settings, cache_dir=cache_dir, progress=False).path
    prof = profile_fit.make_profile(8, 1, [(8, 0.010), (4, 0.006)])
    written = speed_store.store_speed(mine, cache_dir, profile=prof)
    assert str(own) in written and str(foreign) not in written
    assert store.read_cache(own).profile == prof
    assert not store.read_cache(foreign).profile


def test_profile_main_rejects_bad_keeps(capsys):
    with pytest.raises(SystemExit) as exit_:
        profile.profile_main(["/nonexistent", "--keeps", "1.0"])
    assert exit_.value.code == 2
    assert "two or more" in capsys.readouterr().err


def test_parse_load_log_stock_and_miprun():
    stock = ("INFO [base_loader.py:82] Initializing model took 0.499225 seconds\n"
             "INFO [default_loader.py:501] Loading weights took 1.74 seconds\n"
             "INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 1.82 s\n")
    got = profile.parse_load_log(stock)
    assert got["model_load_s"] == pytest.approx(0.499225 + 1.74)
    assert got["vllm_init_engine_s"] == pytest.approx(1.82)
    assert "miprun_loader_s" not in got
    miprun = stock + ("INFO [loader.py:130] miprun: built 23 of 30 blocks, kept [0, 1], pruned [2], "
                      "read 200.1 MiB, skipped 50.2 MiB, load 2.31 s\n")
    assert profile.parse_load_log(miprun)["model_load_s"] == pytest.approx(2.31)
    assert profile.parse_load_log("nothing here") == {}


def test_profile_problem_flags_noise_only():
    good = profile_fit.make_profile(30, 1, [(30, 0.02), (15, 0.012)])
    assert profile_fit.profile_problem(good) is None
    flat = profile_fit.make_profile(30, 1, [(30, 0.012), (15, 0.02)])  # slower with fewer blocks: noise
    assert flat["block_s"][0] == 0.0
    assert "noise" in profile_fit.profile_problem(flat)


def test_profile_command_prints_fit_beside_the_one_model_estimate(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The engine runs are replaced by a line 2 ms + 0.5 ms per block; everything else is real."""
    from vllm_miprun.core.latency import DTYPE_BYTES, ideal_speedup, mean_decode_context

    specs = []

    def fake_run_engine(spec):
        specs.append(spec)
        kept = {1.0: 8, 0.5: 4}[spec["extra"]["keep"]]
        return {"batches": {"1": {"tpot_s": 0.002 + 0.0005 * kept, "ttft_s": 0.01}}}

    monkeypatch.setattr(profile, "run_engine", fake_run_engine)
    code = profile.profile_main([str(tiny_llama_dir), "--keeps", "1.0,0.5", "--dtype", "float32",
                                 "--output-tokens", "8", "--prompt-tokens", "16", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert [s["extra"] for s in specs] == [{"keep": 1.0, "method": "last"}, {"keep": 0.5, "method": "last"}]
    stored = speed_store.read_profile(tiny_llama_dir, tmp_path)
    assert stored["fixed_s"] == pytest.approx(0.002) and stored["block_s"] == [pytest.approx(0.0005)] * 8
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    estimate = ideal_speedup(config, 4, 1, mean_decode_context(16, 8), DTYPE_BYTES["float32"])["estimate"]
    assert stored["measured"]["runs"][1]["estimated_speedup"] == pytest.approx(estimate)
    assert f"speed-up fitted {0.006 / 0.004:.3f}x, estimated without a profile {estimate:.3f}x" in out


@pytest.mark.parametrize("argv, message", [
    (["--keeps", "1.0,1.0"], "two or more distinct ratios"),
    (["--keeps", "1.0,0"], "two or more distinct ratios"),
    (["--output-tokens", "1"], "--output-tokens >= 2"),  # a decode time needs two tokens
])
def test_profile_main_refuses_bad_numbers_before_any_engine(tiny_llama_dir, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(profile, "run_engine", lambda spec: pytest.fail("an engine was started"))
    with pytest.raises(SystemExit) as exit_:
        profile.profile_main([str(tiny_llama_dir), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def _line_engine(specs, fixed_s=0.002, block_s=0.0005):
    def run(spec):
        specs.append(spec)
        kept = {1.0: 8, 0.5: 4}[spec["extra"]["keep"]]
        return {"batches": {"1": {"tpot_s": fixed_s + block_s * kept, "ttft_s": 0.01}}}
    return run


def test_profile_main_sizes_the_kv_cache_in_gib_and_no_store_writes_nothing(tiny_llama_dir, tmp_path,
                                                                           monkeypatch, capsys):
    specs = []
    monkeypatch.setattr(profile, "run_engine", _line_engine(specs))
    argv = [str(tiny_llama_dir), "--keeps", "1.0,0.5", "--cache-dir", str(tmp_path), "--json"]
    assert profile.profile_main(argv + ["--no-store", "--kv-cache-gib", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == []
    assert speed_store.read_profile(tiny_llama_dir, tmp_path) is None and not list(tmp_path.iterdir())
    assert {s["kv_bytes"] for s in specs} == {2**29}
    specs.clear()
    assert profile.profile_main(argv) == 0
    assert {s["kv_bytes"] for s in specs} == {2**28}  # the default, 0.25 GiB
    assert speed_store.read_profile(tiny_llama_dir, tmp_path)["fixed_s"] == pytest.approx(0.002)


def test_a_profile_that_is_only_noise_is_not_stored(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile, "run_engine", _line_engine([], fixed_s=0.01, block_s=-0.0005))  # faster with more
    code = profile.profile_main([str(tiny_llama_dir), "--keeps", "1.0,0.5", "--cache-dir", str(tmp_path)])
    assert code == 2 and "profile not stored" in capsys.readouterr().err
    assert speed_store.read_profile(tiny_llama_dir, tmp_path) is None


def test_run_engine_fails_on_a_worker_exit_status_even_after_a_result_line(monkeypatch):
    """A worker that printed its result and then died (e.g. in vLLM's teardown) is not a
    measurement to trust: measure.py leaves with status 0 once its result is out."""
    line = profile.RESULT_MARK + json.dumps({"batches": {}})
    monkeypatch.setattr(profile, "run_in_own_group", lambda argv, timeout_s, env: (-6, line + "\n", "abort"))
    with pytest.raises(RuntimeError, match=r"engine run failed \(exit -6\)"):
        profile.run_engine({"model": "m", "load_format": "miprun", "extra": {}})
    monkeypatch.setattr(profile, "run_in_own_group", lambda argv, timeout_s, env: (0, line + "\n", ""))
    assert profile.run_engine({"model": "m"})["batches"] == {}
