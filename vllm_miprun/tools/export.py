"""Write a pruned Hugging Face checkpoint that any engine loads as a plain model.

``config.json`` is rewritten by ``remap`` (fewer blocks, per-layer fields sliced, kept
indices recorded), tensors are renumbered and copied shard by shard with safetensors,
reading only non-block tensors and the kept blocks. Tokenizer and generation files are
copied. The folder is built next to ``out_dir`` and renamed into place, so an
interrupted export never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vllm_miprun.model import checkpoint, remap, weights
from vllm_miprun.errors import run_command
from vllm_miprun.option_flags import add_command_flags, command_line_wording, given_options
from vllm_miprun.options import MiprunOptions, OptionError, command_options
from vllm_miprun.model.quant_remap import quantization_overrides

# Files copied unchanged when present: tokenizer, chat template, generation settings.
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def export_pruned(model_dir: str | Path, out_dir: str | Path, plan, heal_maps: dict | None = None) -> Path:
    """Write the model that keeps ``plan.kept`` of ``model_dir`` to ``out_dir``, with
    ``heal_maps`` (``pipeline.heal.prepare_maps``) folded in as the loader folds them."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise OptionError(f"output folder {out_dir} already exists; remove it or pick another")
    hf_config = checkpoint.read_config(model_dir)
    new_config = {**remap.remap_config(hf_config, plan.kept),
                  **quantization_overrides(model_dir, hf_config, plan.kept)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(model_dir, staging, list(plan.kept), heal_maps or {})
        (staging / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        (staging / "miprun_plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_weights(model_dir: Path, staging: Path, kept: list[int], heal_maps: dict) -> None:
    """One output shard per input shard that holds a kept tensor, plus a fresh index."""
    from safetensors.torch import save_file

    from vllm_miprun.pipeline.heal import fold_stream, heal_site

    site = heal_site(checkpoint.read_config(model_dir))
    files, _, _ = weights.plan_reads(checkpoint.safetensors_files(model_dir), kept)
    weight_map: dict[str, str] = {}
    total_size = 0
    for path in files:
        maps = {s: t for s, t in heal_maps.items() if _lands_in(s, kept, path, site.fold_into)}
        tensors = dict(fold_stream(weights.iter_kept_weights([path], kept), maps, kept, site=site))
        save_file(tensors, staging / path.name, metadata={"format": "pt"})
        weight_map.update({name: path.name for name in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / checkpoint.INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _lands_in(start: int, kept: list[int], path: Path, fold_into: str) -> bool:
    """Whether shard ``path`` holds the tensor the map of the run at ``start`` folds into."""
    header = checkpoint.read_header(path)
    if start == 0:
        return "model.embed_tokens.weight" in header
    return any(remap.layer_index(n) == start - 1 and f".{fold_into}." in n for n in header)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``vllm-miprun export``; pass a subparser to extend it in place."""
    parser = parser or argparse.ArgumentParser(prog="vllm-miprun export")
    parser.add_argument("model_dir", help="Hugging Face model folder (safetensors)")
    parser.add_argument("out_dir", help="where to write the pruned checkpoint (must not exist)")
    add_command_flags(parser, command_options("export"), target_required=True)
    return parser


def options_from_args(args: argparse.Namespace) -> MiprunOptions:
    return MiprunOptions.from_dict(given_options(args))


def export_main(argv: list[str]) -> int:
    """``vllm-miprun export MODEL_DIR OUT_DIR --keep R [--method M] ...``; exit status
    (bad input: one line on stderr and 2, as in every ``vllm-miprun`` command)."""
    args = build_parser().parse_args(argv)
    return run_command("vllm-miprun export", lambda: _export(args), wording=command_line_wording)


def _export(args: argparse.Namespace) -> int:
    from vllm_miprun.pipeline.plan import make_plan

    options = options_from_args(args)
    hf_config = checkpoint.read_config(args.model_dir)
    remap.check_architecture(hf_config)
    plan = make_plan(args.model_dir, options, hf_config=hf_config)
    from vllm_miprun.pipeline.heal import prepare_maps

    maps = prepare_maps(args.model_dir, options, list(plan.kept), plan.num_blocks)
    out = export_pruned(args.model_dir, args.out_dir, plan, maps)
    sys.stderr.write(f"wrote {out}: kept blocks {list(plan.kept)} of {plan.num_blocks}\n")
    return 0
