"""Healing the families whose MLP output is normed (Gemma 2/3, OLMo 2) or scaled (Granite)
before the residual add: the fold is exact where each family adds it, and the heal runs."""

from __future__ import annotations

import pytest
import torch

from test_heal import _hf, _logits, assert_fit_equals_fold, family_map
from vllm_miprun.core import heal_math
from vllm_miprun.model import architectures, checkpoint
from vllm_miprun.options import CalibrationSettings, MiprunOptions
from vllm_miprun.pipeline import heal
from vllm_miprun.tools.evaluate import TransformersBackend, delete_blocks
from vllm_miprun.tools.export import export_pruned

# What each family's block adds to the residual stream last, read from the transformers (and
# vLLM) code, independently of the family's ``heal_site``. Granite's is ``residual_multiplier``
# times the MLP output: a map on the MLP output is the same map on the product.
CONTRIBUTION = {"gemma2": "post_feedforward_layernorm", "gemma3": "post_feedforward_layernorm",
                "granite": "mlp", "olmo2": "post_feedforward_layernorm"}
FAMILIES = tuple(CONTRIBUTION)
KEPT = [0, 1, 3, 4]  # of 6: runs [2, 3) and [5, 6), folded into blocks 1 and 4 (no run at block 0: tied embeddings)
NUM_BLOCKS = 6
STARTS = (2, 5)


@pytest.fixture(scope="module")
def family_dirs(family_model):
    """Each family's tiny model at this module's depth (built once per session)."""
    return {arch: family_model(arch, num_layers=NUM_BLOCKS) for arch in FAMILIES}


class _Plan:
    kept = tuple(KEPT)

    def to_json(self):
        return {"kept": KEPT}


def _site(model_dir):
    return architectures.for_config(checkpoint.read_config(model_dir)).heal_site


def _explicit_model(model_dir, arch, maps):
    """The pruned model with each map applied to what block i−1 adds to the residual stream."""
    model = delete_blocks(_hf(model_dir), KEPT)
    for start, t in maps.items():
        module = model.model.layers[KEPT.index(start - 1)].get_submodule(CONTRIBUTION[arch])
        module.register_forward_hook(lambda _m, _i, out, t=t: out @ t.T)
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_folded_export_equals_the_map_applied_to_the_block_contribution(arch, family_dirs, tmp_path):
    """The export's fold (the loader's ``fold_stream``) and the eval backend's in-place fold
    give the pruned model with ``T`` applied to what the block adds to the residual stream."""
    model_dir = family_dirs[arch]
    site = _site(model_dir)
    maps = {start: family_map(128, site, seed=start) for start in STARTS}
    ids = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(1))  # longer than the window
    explicit = _logits(_explicit_model(model_dir, arch, maps), ids)
    folded = _logits(_hf(export_pruned(model_dir, tmp_path / "healed", _Plan(), maps)), ids)
    torch.testing.assert_close(folded, explicit, atol=1e-4, rtol=1e-4)
    in_place = TransformersBackend(model_dir, kept=KEPT, heal_maps=maps).model  # the eval backend's fold
    torch.testing.assert_close(_logits(in_place, ids), explicit, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_block_parts_split_off_what_the_block_adds_to_the_residual_stream(arch, family_dirs):
    """The fit's ``(r, d)``: ``r + d`` is the block's output and ``d`` what it adds last
    (Granite: ``residual_multiplier`` times the MLP output), caught at ``CONTRIBUTION``."""
    from vllm_miprun.model.blockwise import BlockwiseModel
    from vllm_miprun.pipeline.heal_fit import block_parts

    model = BlockwiseModel(family_dirs[arch])
    hidden = model.embed_tokens(torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1)))
    scale = model.config.residual_multiplier if arch == "granite" else 1.0
    with model.block(1) as layer:
        caught = []
        handle = layer.get_submodule(CONTRIBUTION[arch]).register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            out = model.run_block(layer, hidden)
        finally:
            handle.remove()
        r, d = block_parts(model, layer, hidden)
    torch.testing.assert_close(d, caught[0] * scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r + d, out, rtol=1e-5, atol=1e-5)


def _options(tmp_path):
    return MiprunOptions(keep=0.5, heal="linear", cache_dir=str(tmp_path / "cache"),
                         calibration=CalibrationSettings(samples=4, seq_len=32))


def _kl(full: torch.Tensor, pruned_dir, ids) -> float:
    """Mean KL(full model || pruned model) on ``ids``, from the full model's log-probs."""
    pruned = torch.log_softmax(_logits(_hf(pruned_dir), ids), -1)
    return float((full.exp() * (full - pruned)).sum(-1).mean())


@pytest.mark.parametrize("arch", FAMILIES)
def test_heal_fits_and_folds_for_the_family(arch, family_dirs, tmp_path, monkeypatch):
    """Fit and fold end to end, no refusal: the healed export is closer to the full model on
    the calibration text (the fit's) than the unhealed one; a non-diagonal form is refused in one line
    where the map folds into a norm's gain."""
    model_dir = family_dirs[arch]
    options = _options(tmp_path)
    maps = heal.prepare_maps(model_dir, options, KEPT, NUM_BLOCKS, progress=False)
    assert sorted(maps) == list(STARTS)
    ids = heal.heal_ids(model_dir, options.calibration)
    healed = export_pruned(model_dir, tmp_path / "healed", _Plan(), maps)
    plain = export_pruned(model_dir, tmp_path / "plain", _Plan(), {})
    full = torch.log_softmax(_logits(_hf(model_dir), ids), -1)
    assert _kl(full, healed, ids) < _kl(full, plain, ids)
    if _site(model_dir).folds_into_norm:
        monkeypatch.setitem(heal.RECIPE, "form", "full")
        monkeypatch.setattr(heal, "fit_maps", lambda *a, **k: pytest.fail("refused before any fit"))
        with pytest.raises(heal.HealError, match="takes only a diagonal map") as err:
            heal.prepare_maps(model_dir, _options(tmp_path / "full"), KEPT, NUM_BLOCKS, progress=False)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", FAMILIES)
def test_distill_trains_each_family_s_maps_at_its_fold_site(arch, family_dirs, tmp_path):
    """heal=distill hooks the map where the family's ``heal_site`` catches the MLP output;
    the folded export must then be closer to the full model than heal=linear's. A norm's
    gain takes one scale per channel, so there the maps stay diagonal."""
    model_dir = family_dirs[arch]
    ids = heal.heal_ids(model_dir, _options(tmp_path).calibration)
    full = torch.log_softmax(_logits(_hf(model_dir), ids), -1)
    kls = {}
    for mode in ("linear", "distill"):
        options = MiprunOptions(keep=0.5, heal=mode, cache_dir=str(tmp_path / "cache"),
                                calibration=_options(tmp_path).calibration)
        maps = heal.prepare_maps(model_dir, options, KEPT, NUM_BLOCKS, progress=False)
        exported = export_pruned(model_dir, tmp_path / mode, _Plan(), maps)
        kls[mode] = _kl(full, exported, ids)
    assert all(heal_math.is_diagonal(t) for t in maps.values()) == _site(model_dir).folds_into_norm
    assert kls["distill"] < kls["linear"]
    # Eager attention, as the fit runs it: transformers' SDPA path skips Gemma 2's attention soft-cap.
    assert_fit_equals_fold(model_dir, ids, KEPT, maps, _logits(_eager(model_dir), ids), _logits(_eager(exported), ids))


def _eager(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
