"""export_pruned writes a checkpoint transformers loads as the same pruned model (no engine)."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_miprun.tools.export import export_main, export_pruned
from vllm_miprun.options import MiprunOptions, OptionError
from vllm_miprun.pipeline.plan import make_plan

KEEP_HALF = {"keep": 0.5, "method": "last"}


def _plan(model_dir, extra=KEEP_HALF):
    config = json.loads((model_dir / "config.json").read_text())
    return make_plan(model_dir, MiprunOptions.from_dict(extra), hf_config=config)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_export_equals_full_model_with_blocks_deleted(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    plan = _plan(model_dir)
    out = export_pruned(model_dir, tmp_path / "pruned", plan)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(plan.kept) == 4
    assert config["miprun_kept_layers"] == list(plan.kept)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".pruned.tmp-*"))

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    full.model.layers = torch.nn.ModuleList(full.model.layers[i] for i in plan.kept)
    full.config.num_hidden_layers = len(plan.kept)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    torch.testing.assert_close(_logits(pruned, ids), _logits(full, ids))


def test_export_refuses_existing_output(tiny_llama_dir, tmp_path):
    (tmp_path / "pruned").mkdir()
    with pytest.raises(OptionError, match="already exists"):
        export_pruned(tiny_llama_dir, tmp_path / "pruned", _plan(tiny_llama_dir))


def test_export_main_reports_bad_keep_without_writing(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse checks the value with the option's parser
        export_main([str(tiny_llama_dir), str(tmp_path / "out"), "--keep", "1.5"])
    assert exit_.value.code == 2
    assert "keep must be a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_command_folds_the_heal_maps_it_fits(tiny_llama_dir, tmp_path):
    """``vllm-miprun export --heal linear`` writes the healed model: the maps it fits (and
    stores) are folded in, so it differs from the unhealed export of the same plan."""
    from safetensors.torch import load_file

    common = ["--keep", "0.5", "--method", "last", "--samples", "4", "--seq-len", "32",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert export_main([str(tiny_llama_dir), str(tmp_path / "plain"), *common]) == 0
    assert export_main([str(tiny_llama_dir), str(tmp_path / "healed"), *common, "--heal", "linear"]) == 0
    assert list((tmp_path / "cache").glob("*-heal-*.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    healed = load_file(str(tmp_path / "healed" / "model.safetensors"))
    assert plain.keys() == healed.keys()
    changed = sorted(name for name in plain if not torch.equal(plain[name], healed[name]))
    assert changed and all("down_proj" in name or "embed_tokens" in name for name in changed)


def test_export_renumbers_the_quantization_config(tiny_llama_dir, tmp_path):
    """A rule naming full-model block 7 names block 3 of the exported 4-block model."""
    from test_quantization import QCONFIGS, write_quantized_checkpoint

    qcfg = dict(QCONFIGS["gptq"], dynamic={r"-:model\.layers\.7\..*": {}})
    model = tmp_path / "gptq"
    write_quantized_checkpoint(tiny_llama_dir, model, "gptq", qcfg, float_blocks=(7,))
    plan = _plan(model)
    assert list(plan.kept) == [0, 1, 2, 7]
    out = export_pruned(model, tmp_path / "pruned", plan)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["dynamic"] == {r"-:model\.layers\.3\..*": {}}
