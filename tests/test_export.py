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
