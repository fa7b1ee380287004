"""Healing: the fold is exact, fitted maps help, stored maps are keyed and refused, bad values fail."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from tiny_models import FAMILY_ARCHS, make_tiny_model
from vllm_miprun.core import heal_math
from vllm_miprun.model import checkpoint, remap, weights
from vllm_miprun.model.architectures.base import HealSite
from vllm_miprun.options import CalibrationSettings, MiprunOptions, OptionError
from vllm_miprun.pipeline import heal, heal_fit
from vllm_miprun.tools.evaluate import delete_blocks

KEPT = [1, 2, 5, 6]  # pruned 0, 3, 4, 7: a run at block 0 (untied embedding), one inside, one at the end
NUM_BLOCKS = 8


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _random_maps(dim: int, starts, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=gen) / dim ** 0.5 for s in starts}


def _explicit_model(model_dir, maps):
    """The pruned model with each map applied as an explicit linear layer after block i−1's MLP."""
    model = delete_blocks(_hf(model_dir), KEPT)
    for start, t in maps.items():
        module = model.model.embed_tokens if start == 0 else model.model.layers[KEPT.index(start - 1)].mlp
        module.register_forward_hook(lambda _m, _i, out, t=t: out @ t.T)
    return model


def _folded_model(model_dir, maps, kept=KEPT):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**remap.remap_config(checkpoint.read_config(model_dir), kept))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    files = checkpoint.safetensors_files(model_dir)
    site = heal.heal_site(checkpoint.read_config(model_dir))
    state = dict(heal.fold_stream(weights.iter_kept_weights(files, kept), maps, kept, site))
    model.load_state_dict(state, strict=True)
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_fold_equals_explicit_map_after_block(tiny_llama_dir):
    starts = [s for s, _ in heal_math.pruned_runs([0, 3, 4, 7])]
    assert starts == [0, 3, 7]
    maps = _random_maps(128, starts)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    explicit = _logits(_explicit_model(tiny_llama_dir, maps), ids)
    folded = _logits(_folded_model(tiny_llama_dir, maps), ids)
    plain = _logits(_folded_model(tiny_llama_dir, {}), ids)
    assert torch.allclose(folded, explicit, atol=1e-4, rtol=1e-4)
    in_place = delete_blocks(_hf(tiny_llama_dir), KEPT)  # the eval backend's path
    heal.fold_into_model(in_place, maps, KEPT, heal.heal_site(checkpoint.read_config(tiny_llama_dir)))
    assert torch.allclose(_logits(in_place, ids), explicit, atol=1e-4, rtol=1e-4)
    assert (folded - plain).abs().max() > 0.1  # the maps do change the model


class _KeptPlan:
    """The part of a plan that ``export_pruned`` reads."""

    kept = tuple(KEPT)

    def to_json(self):
        return {"kept": KEPT}


def test_export_writes_the_same_folded_weights(tiny_llama_dir, tmp_path):
    from vllm_miprun.tools.export import export_pruned

    maps = _random_maps(128, [0, 3, 7], seed=2)
    out = export_pruned(tiny_llama_dir, tmp_path / "healed", _KeptPlan(), maps)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_logits(_hf(out), ids), _logits(_folded_model(tiny_llama_dir, maps), ids), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(KEPT)


def test_fit_map_recovers_a_linear_map_and_ridge_shrinks_to_identity():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen)
    truth = torch.eye(16) + 0.5 * torch.randn(16, 16, generator=gen)
    y = x @ truth.T + 0.01 * torch.randn(2000, 16, generator=gen)
    for form in ("full", "lowrank"):
        fitted = heal_math.fit_map(x, y, form=form, rank=16)
        assert torch.allclose(fitted, truth, atol=0.02), form
    assert torch.allclose(heal_math.fit_map(x, y, ridge=1e9), torch.eye(16), atol=1e-4)
    assert heal_math.residual_share(x, y, heal_math.fit_map(x, y)) < 1e-3
    diag = heal_math.fit_map(x, x * 2.0, form="diag")
    assert torch.allclose(diag, 2.0 * torch.eye(16), atol=1e-5)
    for form in ("diag", "rotdiag"):  # the ridge pulls every form toward the identity, not toward 0
        assert torch.allclose(heal_math.fit_map(x, y, form=form, ridge=1e9), torch.eye(16), atol=1e-4), form


def test_fit_map_ridge_is_scale_free():
    """The ridge is relative to the inputs' scale: the same data in other units, the same map."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=gen)
    y = x @ (torch.eye(8) + 0.3 * torch.randn(8, 8, generator=gen)).T
    for form in ("full", "diag"):
        small = heal_math.fit_map(x, y, form=form, ridge=0.05)
        large = heal_math.fit_map(100.0 * x, 100.0 * y, form=form, ridge=0.05)
        assert torch.allclose(small, large, atol=1e-5), form
        assert not torch.allclose(small, heal_math.fit_map(x, y, form=form), atol=1e-3), form  # it acts


def test_pruned_runs_are_maximal_half_open_ranges():
    assert heal_math.pruned_runs([5, 3, 4, 9, 0]) == [(0, 1), (3, 6), (9, 10)]
    assert heal_math.pruned_runs([]) == []


def _options(tmp_path, **kw):
    calibration = CalibrationSettings(samples=4, seq_len=32)
    return MiprunOptions(keep=0.5, heal="linear", cache_dir=str(tmp_path / "cache"), calibration=calibration, **kw)


def _calibration_kl(model_dir, maps, ids):
    """Mean KL(full model || pruned model) on ``ids``: what healing should lower."""
    full = torch.log_softmax(_logits(_hf(model_dir), ids), -1)
    pruned = torch.log_softmax(_logits(_folded_model(model_dir, maps), ids), -1)
    return float((full.exp() * (full - pruned)).sum(-1).mean())


def test_prepare_maps_fits_stores_and_reuses(tiny_llama_dir, tmp_path, monkeypatch):
    options = _options(tmp_path)
    assert heal.needs_fit(tiny_llama_dir, options, KEPT, NUM_BLOCKS)
    maps = heal.prepare_maps(tiny_llama_dir, options, KEPT, NUM_BLOCKS, progress=False)
    assert sorted(maps) == [0, 3, 7]
    assert not heal.needs_fit(tiny_llama_dir, options, KEPT, NUM_BLOCKS)  # stored: read, not fitted
    stored = list((tmp_path / "cache").glob("*-heal-*.safetensors"))
    assert len(stored) == 1
    ids = heal.heal_ids(tiny_llama_dir, options.calibration)
    assert _calibration_kl(tiny_llama_dir, maps, ids) < _calibration_kl(tiny_llama_dir, {}, ids)

    def no_fit(*_a, **_k):
        raise AssertionError("stored maps must be reused, not refitted")

    monkeypatch.setattr(heal, "fit_maps", no_fit)
    again = heal.prepare_maps(tiny_llama_dir, options, KEPT, NUM_BLOCKS, progress=False)
    assert all(torch.equal(again[s], maps[s]) for s in maps)
    assert heal.prepare_maps(tiny_llama_dir, MiprunOptions(keep=0.5), KEPT, NUM_BLOCKS) == {}


def test_distill_trains_the_maps_the_loader_folds_below_the_least_squares_fit(tiny_llama_dir, tmp_path):
    """heal=distill starts from the least-squares maps and trains them on the next-token KL:
    the *folded* model (the loader's path, embedding run included) is closer to the full
    model than with heal=linear's maps, so the trained maps act where the fold puts them."""
    linear = heal.prepare_maps(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS, progress=False)
    distill_options = MiprunOptions(keep=0.5, heal="distill", cache_dir=str(tmp_path / "cache"),
                                    calibration=_options(tmp_path).calibration)
    distilled = heal.prepare_maps(tiny_llama_dir, distill_options, KEPT, NUM_BLOCKS, progress=False)
    assert sorted(distilled) == [0, 3, 7] and not any(heal_math.is_diagonal(t) for t in distilled.values())
    assert len(list((tmp_path / "cache").glob("*-heal-*.safetensors"))) == 2  # each mode its own maps
    ids = heal.heal_ids(tiny_llama_dir, distill_options.calibration)
    assert _calibration_kl(tiny_llama_dir, distilled, ids) < 0.9 * _calibration_kl(tiny_llama_dir, linear, ids)
    folded = _logits(_folded_model(tiny_llama_dir, distilled), ids)
    assert_fit_equals_fold(tiny_llama_dir, ids, KEPT, distilled, _logits(_hf(tiny_llama_dir), ids), folded)


def assert_fit_equals_fold(model_dir, ids, kept, maps, full_logits, folded_logits):
    """The loss the distillation minimised, evaluated at its answer, is the folded model's KL
    (next tokens at every position but the last): the fit trains the model that is served."""
    with torch.no_grad():
        fitted = float(heal_fit.HealedKL(model_dir, ids, kept, sorted(maps))(maps))
    full, folded = (torch.log_softmax(x[:, :-1].float(), -1) for x in (full_logits, folded_logits))
    served = float((full.exp() * (full - folded)).sum(-1).mean())
    assert fitted == pytest.approx(served, rel=1e-4, abs=1e-6)


def test_sequential_and_independent_fits_agree_on_the_first_inner_run(tiny_llama_dir, tmp_path, monkeypatch):
    """The first run's input is the full model's prefix either way, so both fits agree on it;
    the second run's input differs once the first run is pruned and healed."""
    kept = [0, 1, 2, 5, 6]  # runs [3, 5) and [7, 8)
    ids = heal.heal_ids(tiny_llama_dir, _options(tmp_path).calibration)
    fits = {}
    for sequential in (False, True):
        monkeypatch.setitem(heal.RECIPE, "sequential", sequential)
        fits[sequential] = heal.fit_maps(tiny_llama_dir, ids, kept, [3, 7], progress=False)
    assert torch.allclose(fits[False][3], fits[True][3], atol=1e-5)  # same (unpruned) prefix
    assert not torch.allclose(fits[False][7], fits[True][7], atol=1e-3)  # healed prefix differs


def test_a_runs_map_is_the_least_squares_stand_in_for_the_state_after_the_run(tiny_llama_dir, tmp_path):
    """Block 2's output is ``r + d`` (``d`` its MLP's contribution): the map of the pruned run
    [3, 5) is the per-channel least-squares ``T`` with ``r + T d ≈ h_5``, the full model's state
    after the run, that is ``T_kk = Σ d_k (h_5 − r)_k / Σ d_k²``."""
    from vllm_miprun.model.blockwise import BlockwiseModel

    kept = [0, 1, 2, 5, 6, 7]
    ids = heal.heal_ids(tiny_llama_dir, _options(tmp_path).calibration)
    (fitted,) = heal.fit_maps(tiny_llama_dir, ids, kept, [3], progress=False).values()
    model = BlockwiseModel(tiny_llama_dir)
    hidden = model.embed_tokens(ids)
    for block in range(5):
        with model.block(block) as layer:
            if block == 2:
                r, d = heal_fit.block_parts(model, layer, hidden)
            hidden = model.run_block(layer, hidden)
    x, y = d.reshape(-1, d.shape[-1]).double(), (hidden - r).reshape(-1, d.shape[-1]).double()
    expected = (x * y).sum(0) / (x * x).sum(0)
    assert heal_math.is_diagonal(fitted)
    torch.testing.assert_close(torch.diagonal(fitted).double(), expected, rtol=1e-4, atol=1e-5)


def test_heal_windows_take_the_samples_from_each_corpus_of_the_mix(tiny_llama_dir):
    """The recipe fits on wiki and c4 together: ``samples`` windows from each, in that order."""
    from dataclasses import replace

    from vllm_miprun.pipeline.calibrate import calibration_ids

    settings = CalibrationSettings(samples=2, seq_len=16)  # dataset wiki, one of the mix
    expected = torch.cat([calibration_ids(tiny_llama_dir, replace(settings, dataset=name)) for name in ("wiki", "c4")])
    assert heal.RECIPE["mix"] == ["wiki", "c4"]
    assert torch.equal(heal.heal_ids(tiny_llama_dir, settings), expected)


def test_stored_maps_for_other_weights_or_settings_are_refused(tiny_llama_dir, tmp_path):
    options = _options(tmp_path)
    heal.prepare_maps(tiny_llama_dir, options, KEPT, NUM_BLOCKS, progress=False)
    (path,) = (tmp_path / "cache").glob("*-heal-*.safetensors")
    # other weights, same folder name: put the stored maps where that model's maps would be
    other = make_tiny_model(tmp_path / "other" / tiny_llama_dir.name, seed=7)
    from vllm_miprun.model.fingerprint import model_fingerprint

    record = heal.heal_record(model_fingerprint(other), options.calibration.to_json(), KEPT, NUM_BLOCKS)
    shutil.copy(path, heal.heal_path(other, record, options.cache_dir))
    with pytest.raises(heal.HealError, match="other weights"):
        heal.prepare_maps(other, options, KEPT, NUM_BLOCKS, progress=False)
    own = heal.heal_record(model_fingerprint(tiny_llama_dir), options.calibration.to_json(), KEPT, NUM_BLOCKS)
    with pytest.raises(heal.HealError, match="calibration"):
        heal.read_maps(path, {**own, "calibration": {**own["calibration"], "samples": 8}})
    with pytest.raises(heal.HealError, match="kept"):
        heal.read_maps(path, {**own, "kept": [0, 1, 2, 3]})


def test_run_at_block_zero_with_tied_embedding_stays_unhealed(caplog):
    names = [f"model.layers.{b}.mlp.down_proj.weight" for b in range(NUM_BLOCKS)]
    llama = HealSite()  # Llama-style: maps fold into mlp.down_proj
    assert heal.check_foldable(KEPT, NUM_BLOCKS, names, tied=True, site=llama) == [3, 7]
    assert heal.check_foldable(KEPT, NUM_BLOCKS, names, tied=False, site=llama) == [0, 3, 7]
    with pytest.raises(heal.HealError, match="down_proj"):
        heal.check_foldable(KEPT, NUM_BLOCKS, ["model.layers.2.mlp.fc2.weight"], tied=False, site=llama)


def test_bad_heal_value_is_one_line(capsys):
    with pytest.raises(OptionError) as err:
        MiprunOptions.from_dict({"keep": 0.75, "heal": "cubic"})
    assert "\n" not in str(err.value) and "none, linear" in str(err.value) and "'cubic'" in str(err.value)
    from vllm_miprun.tools.export import export_main

    with pytest.raises(SystemExit) as exit_info:
        export_main(["model", "out", "--keep", "0.75", "--heal", "cubic"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "--heal" in lines[0] and "cubic" in lines[0]


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["linear", "distill"])  # distill: a full (non-diagonal) map in down_proj
def test_vllm_serving_healed_equals_transformers_on_healed_export(tiny_llama_dir, tmp_path, mode):
    """The loader's fold (vLLM) and the export's fold (read back by transformers) agree in greedy tokens."""
    from engine_runner import DEFAULT_PROMPTS
    from engine_kit import run_engines
    from transformers import AutoTokenizer

    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.tools.export import export_pruned

    extra = {"keep": 0.5, "method": "last", "heal": mode, "samples": 4, "seq_len": 32,
             "cache_dir": str(tmp_path / "cache")}
    options = MiprunOptions.from_dict(extra)
    plan = make_plan(tiny_llama_dir, options, hf_config=checkpoint.read_config(tiny_llama_dir))
    maps = heal.prepare_maps(tiny_llama_dir, options, list(plan.kept), plan.num_blocks, progress=False)
    assert sorted(maps) == [3]  # "last" keeps 0, 1, 2, 7: one run [3, 7), folded into block 2
    assert heal_math.is_diagonal(maps[3]) == (mode == "linear")
    exported = export_pruned(tiny_llama_dir, tmp_path / "healed", plan, maps)
    spec = {"model": str(tiny_llama_dir), "load_format": "miprun", "kv_bytes": 16 * 2**20, "max_tokens": 12}
    healed, plain = run_engines([{**spec, "extra": extra}, {**spec, "extra": {**extra, "heal": "none"}}],
                                VLLM_ENABLE_V1_MULTIPROCESSING="0")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = _hf(exported)
    for prompt, tokens in zip(DEFAULT_PROMPTS, healed["tokens"]):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert out[0, ids.shape[1]:].tolist() == tokens
    assert healed["logprobs"] != plain["logprobs"]  # the served model is the healed one


def fold_into_layer(layer, transform: torch.Tensor, site) -> None:
    """Fold one map into a transformers decoder layer in place, through ``fold_stream`` (the
    loader's and the export's fold): the layer's tensors named as block 0 of a model whose run
    ``[1, ·)`` is healed."""
    params = {f"model.layers.0.{n}": p.detach() for n, p in layer.named_parameters()}
    for name, tensor in heal.fold_stream(params.items(), {1: transform}, [0], site=site):
        if tensor is not params[name]:
            params[name].copy_(tensor)


def family_map(dim: int, site, seed: int = 0) -> torch.Tensor:
    """A random map of the form the family's site takes: diagonal for a norm's gain, full otherwise."""
    if site.folds_into_norm:
        return torch.diag(1.0 + 0.5 * torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return _random_maps(dim, [1], seed)[1]


def _fold_is_exact(model_dir, block: int) -> bool:
    """Whether ``T`` folded into block ``block`` where its family's ``heal_site`` says turns the
    block's output into ``r + T d``, with ``(r, d)`` as the fit catches them: the identity the
    heal fit assumes."""
    from vllm_miprun.model.blockwise import BlockwiseModel

    runner = BlockwiseModel(model_dir)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        hidden = runner.embed_tokens(ids)
        with runner.block(block) as layer:
            r, d = heal_fit.block_parts(runner, layer, hidden)
            t = family_map(d.shape[-1], runner.family.heal_site)
            fold_into_layer(layer, t, runner.family.heal_site)
            folded = runner.run_block(layer, hidden)
    return torch.allclose(folded, r + d @ t.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(FAMILY_ARCHS))
def test_every_family_folds_its_map_where_the_fit_caught_it(arch, family_model):
    """For every family: in its first block with a dense MLP, the map folded into the family's
    fold target is the map the fit sees (``r + T d``); a block without one (MoE) is refused by name."""
    from vllm_miprun.model import architectures

    model_dir = family_model(arch)
    config = checkpoint.read_config(model_dir)
    site = architectures.for_config(config).heal_site
    names = [n for f in checkpoint.safetensors_files(model_dir) for n in checkpoint.read_header(f)]
    dense = [b for b in range(4) if any(n.startswith(f"model.layers.{b}.{site.fold_into}.") for n in names)]
    if dense:  # the MoE families' dense blocks too
        assert _fold_is_exact(model_dir, dense[0]), arch
    if 1 not in dense:  # an MoE block or another MLP layout before the run: refused by name
        with pytest.raises(heal.HealError, match="mlp.down_proj"):
            heal.check_foldable([0, 1, 3], 4, names, tied=True, site=site)


def test_a_tied_config_leaves_the_run_at_block_zero_unhealed_even_with_lm_head_stored(tiny_llama_dir, tmp_path):
    """``tie_word_embeddings`` ties the embedding to the LM head even where the checkpoint also
    stores ``lm_head.weight``: folding a map into the embedding would change the head too."""
    tied = tmp_path / "tied"
    shutil.copytree(tiny_llama_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert "lm_head.weight" in checkpoint.tensor_names(tied)
    starts, _, _ = heal.maps_request(tied, _options(tmp_path), KEPT, NUM_BLOCKS)
    assert starts == [3, 7]
    untied_starts, _, _ = heal.maps_request(tiny_llama_dir, _options(tmp_path), KEPT, NUM_BLOCKS)
    assert untied_starts == [0, 3, 7]


def test_distillation_loss_is_the_kl_of_the_folded_model(tiny_llama_dir):
    """``HealedKL`` (what distillation minimises) is ``KL(p_full || p_pruned)`` of the model the
    loader builds with these maps folded in, at every position but the last, in nats."""
    ids = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    maps = _random_maps(_hf(tiny_llama_dir).config.hidden_size, [0, 3, 7], seed=1)
    objective = heal_fit.HealedKL(tiny_llama_dir, ids, KEPT, sorted(maps))
    full = torch.log_softmax(_logits(_hf(tiny_llama_dir), ids)[:, :-1], -1)
    pruned = torch.log_softmax(_logits(_folded_model(tiny_llama_dir, maps), ids)[:, :-1], -1)
    expected = float((full.exp() * (full - pruned)).sum(-1).mean())
    assert float(objective(maps)) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(objective({})) == pytest.approx(
        float((full.exp() * (full - torch.log_softmax(_logits(_folded_model(tiny_llama_dir, {}), ids)[:, :-1], -1)))
              .sum(-1).mean()), rel=1e-4, abs=1e-6)
    kept = [0, 1, 2, 5, 6]  # maps at 3 and 7 only: the stream before block 2 is the full model's
    inner = {s: maps[s] for s in (3, 7)}
    pruned = torch.log_softmax(_logits(_folded_model(tiny_llama_dir, inner, kept), ids)[:, :-1], -1)
    expected = float((full.exp() * (full - pruned)).sum(-1).mean())
    assert float(heal_fit.HealedKL(tiny_llama_dir, ids, kept, [3, 7])(inner)) == pytest.approx(expected, rel=1e-4,
                                                                                                 abs=1e-6)


def test_distillation_loss_counts_an_unhealed_pruned_run_before_the_first_map(tiny_llama_dir):
    """With a tied embedding the run at block 0 stays unhealed, so the maps start at 3 and 7.
    The loss must still be the served model's: started from the full model's stream at block 2
    (past pruned block 0), it was another model's (0.30 nats against the served model's 0.81)."""
    ids = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    maps = _random_maps(_hf(tiny_llama_dir).config.hidden_size, [3, 7], seed=1)
    objective = heal_fit.HealedKL(tiny_llama_dir, ids, KEPT, sorted(maps))
    full = torch.log_softmax(_logits(_hf(tiny_llama_dir), ids)[:, :-1], -1)
    pruned = torch.log_softmax(_logits(_folded_model(tiny_llama_dir, maps), ids)[:, :-1], -1)
    served = float((full.exp() * (full - pruned)).sum(-1).mean())
    assert float(objective(maps)) == pytest.approx(served, rel=1e-4, abs=1e-6)


def test_fold_stream_refuses_a_checkpoint_without_the_tensors_its_maps_target():
    """A whole checkpoint (``complete``) whose fold target never comes, or whose FP8 target
    weight comes without its scale, is refused; a partial weight push is not."""
    site = HealSite()
    eye = {3: torch.eye(4)}  # folds into block 2, which is kept block 1 of KEPT
    stream = [("model.embed_tokens.weight", torch.ones(8, 4)), ("model.layers.0.mlp.down_proj.weight", torch.ones(4, 6))]
    with pytest.raises(heal.HealError, match="never came"):
        list(heal.fold_stream(iter(stream), eye, KEPT, site))
    assert [name for name, _ in heal.fold_stream(iter(stream), eye, KEPT, site, complete=False)] == [
        name for name, _ in stream]
    fp8 = [("model.layers.1.mlp.down_proj.weight", torch.ones(4, 6).to(torch.float8_e4m3fn))]  # no weight_scale
    with pytest.raises(heal.HealError, match="never came"):
        list(heal.fold_stream(iter(fp8), {3: torch.ones(4)}, KEPT, site))


def test_export_of_a_sharded_checkpoint_folds_each_map_into_the_shard_of_its_block(tiny_llama_dir, tmp_path):
    """One block per shard: the map of the run at 3 folds into block 2's shard, not into the
    (pruned, unread) shard of block 3; the export loads as the folded model, with an index."""
    from fake_hub import write_sharded_repo
    from vllm_miprun.tools.export import export_pruned

    sharded = tmp_path / "sharded"
    write_sharded_repo(tiny_llama_dir, sharded, blocks_per_shard=1)

    maps = _random_maps(128, [0, 3, 7], seed=2)
    out = export_pruned(sharded, tmp_path / "healed", _KeptPlan(), maps)
    assert (out / checkpoint.INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_logits(_hf(out), ids), _logits(_folded_model(tiny_llama_dir, maps), ids), atol=1e-5)
    two = tmp_path / "two-shards"  # every block in one shard, the head in another: still an index
    write_sharded_repo(tiny_llama_dir, two, blocks_per_shard=8)
    out = export_pruned(two, tmp_path / "healed-two", _KeptPlan(), maps)
    assert (out / checkpoint.INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) == 2
    stored = sum(end - start for shard in out.glob("*.safetensors")
                 for start, end in (info["data_offsets"] for info in checkpoint.read_header(shard).values()))
    assert json.loads((out / checkpoint.INDEX_NAME).read_text())["metadata"]["total_size"] == stored  # bytes
    assert torch.allclose(_logits(_hf(out), ids), _logits(_folded_model(tiny_llama_dir, maps), ids), atol=1e-5)


def test_require_cache_refuses_to_fit_missing_maps(tiny_llama_dir, tmp_path, monkeypatch):
    def no_fit(*_a, **_k):
        raise AssertionError("require_cache must not fit")

    monkeypatch.setattr(heal, "fit_maps", no_fit)
    with pytest.raises(heal.HealError, match="no heal maps at .* and require_cache is set"):
        heal.prepare_maps(tiny_llama_dir, _options(tmp_path, require_cache=True), KEPT, NUM_BLOCKS, progress=False)
