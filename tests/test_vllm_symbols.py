"""The vLLM names the project imports exist in the installed vLLM and in the recorded releases
(``scripts/check_vllm_release.py`` read the 0.32.0, 0.33.0 and 0.34.0 wheels); the checker itself on
a small made-up vLLM tree. No network, no vLLM import."""

from __future__ import annotations

import json
import site
import textwrap
from pathlib import Path

import pytest

from vllm_miprun.tools.vllm_symbols import SourceTree, check, file_requirements, project_requirements
from vllm_miprun.vllm.compat import CHECKED_VLLM_RELEASES

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "benchmarks" / "results" / "vllm_symbols.json"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def made_up_release(tmp_path):
    _write(tmp_path / "release", {
        "vllm/__init__.py": "MODULE_ATTRS = {'LLM': '.llm:LLM'}\ndef __getattr__(name): ...\n",
        "vllm/envs.py": "VLLM_HOST_IP = ''\n",
        "vllm/common/cli_args.py": "def make_arg_parser(p): return p\n",
        "vllm/loader.py": "try:\n    from x import Base\nexcept ImportError:\n    Base = object\nclass Loader(Base): ...\n",
    })
    return SourceTree(tmp_path / "release")


def _project_file(tmp_path: Path, text: str) -> list:
    path = tmp_path / "uses.py"
    path.write_text(textwrap.dedent(text))
    return file_requirements(path, "uses.py")


def test_defined_names_pass_and_missing_ones_are_named_where_used(tmp_path, made_up_release):
    reqs = _project_file(tmp_path, """
        from vllm import LLM, envs
        from vllm.loader import Loader, Base, Gone
        import vllm.common.cli_args
        value = envs.VLLM_HOST_IP + envs.VLLM_MISSING
        from vllm.old.place import make_arg_parser
    """)
    missing = check(made_up_release, reqs)["missing"]
    assert missing == {"vllm.envs.VLLM_MISSING": ["uses.py:5"], "vllm.loader.Gone": ["uses.py:3"],
                       "vllm.old.place.make_arg_parser": ["uses.py:6"]}


def test_an_import_with_a_fallback_needs_one_branch_that_exists(tmp_path, made_up_release):
    either = """
        try:
            from vllm.common.cli_args import make_arg_parser
        except ImportError:
            from vllm.launchers.cli_args import make_arg_parser
    """
    assert check(made_up_release, _project_file(tmp_path, either))["missing"] == {}
    neither = either.replace("vllm.common", "vllm.nowhere")
    assert list(check(made_up_release, _project_file(tmp_path, neither))["missing"]) == \
        ["every branch of uses.py:try@2"]


def test_the_installed_vllm_defines_every_name_the_project_imports():
    installed = next(Path(p) for p in site.getsitepackages() if (Path(p) / "vllm" / "envs.py").is_file())
    result = check(SourceTree(installed), project_requirements(REPO))
    assert result["missing"] == {}
    assert "vllm.model_executor.model_loader.register_model_loader" in result["symbols"]


# Names a release may lack where the code has a stated fallback (none today).
KNOWN_GAPS: dict[str, tuple[str, ...]] = {}


def test_the_recorded_release_check_covers_every_vllm_name_the_project_imports_now():
    record = json.loads(RECORD.read_text())["releases"]
    assert sorted(record) == sorted(CHECKED_VLLM_RELEASES)
    installed = next(Path(p) for p in site.getsitepackages() if (Path(p) / "vllm" / "envs.py").is_file())
    now = set(check(SourceTree(installed), project_requirements(REPO))["symbols"])
    for version, result in record.items():
        gaps = [name for name in result["missing"] if not name.startswith(KNOWN_GAPS.get(version, ()))]
        assert gaps == [], version
        unchecked = now - set(result["symbols"])
        assert not unchecked, (f"vLLM {version} was not checked for {sorted(unchecked)}; run "
                               f"`python scripts/check_vllm_release.py {' '.join(CHECKED_VLLM_RELEASES)}`")
