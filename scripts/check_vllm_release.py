"""Check that vLLM releases define every vLLM name the project imports; record the result.

    python scripts/check_vllm_release.py 0.32.0 0.33.0

Downloads each release's wheel with pip (``pip download --no-deps``; network, about 340 MB
each, deleted afterwards; nothing is installed), reads its Python files with ``ast``
(``vllm_miprun.tools.vllm_symbols``) and writes ``benchmarks/results/vllm_symbols.json``.
``tests/test_vllm_symbols.py`` fails when the project imports a vLLM name that this record
did not check, so rerun the script after adding a vLLM import. Exit status 1 if a release
lacks a name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.pipeline.store import atomic_write_text  # noqa: E402
from vllm_miprun.tools.vllm_symbols import SourceTree, check, project_requirements  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "vllm_symbols.json"


def download_wheel(version: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "-d", str(folder), f"vllm=={version}"], check=True, stdout=subprocess.DEVNULL)
    return next(folder.glob(f"vllm-{version}-*.whl"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="vLLM releases, e.g. 0.32.0 0.33.0")
    args = parser.parse_args()
    requirements = project_requirements(ROOT)
    releases = {}
    for version in args.versions:
        with tempfile.TemporaryDirectory(prefix=f"vllm-{version}-") as folder:
            wheel = download_wheel(version, Path(folder))
            result = check(SourceTree(wheel), requirements)
            releases[version] = {"wheel": wheel.name, "sha256": sha256(wheel), **result}
        print(f"vLLM {version}: {len(result['symbols'])} names checked, missing {result['missing'] or 'none'}")
    record = {"what": "every vLLM name vllm_miprun/ and tests/ import, looked up in each release's wheel "
                      "(ast, no import); written by scripts/check_vllm_release.py",
              "releases": releases}
    atomic_write_text(RESULT, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 1 if any(r["missing"] for r in releases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
