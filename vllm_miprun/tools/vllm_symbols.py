"""Does a vLLM release define every vLLM name the project imports? Read with ``ast``, no import.

The project's files (``vllm_miprun/`` and ``tests/``) are parsed for ``import vllm...`` and
``from vllm... import NAME``, and for ``ALIAS.ATTR`` where ``ALIAS`` is a vLLM module they
imported. Each is looked up in a vLLM source tree: an installed ``site-packages`` folder or
a wheel, unpacked or not, so a release that cannot run here (a CUDA wheel) is checked too.
A name counts as defined when the module binds it at top level (def, class, assignment,
import), when it is a submodule, or when the module has a ``__getattr__`` and mentions the
name as a string (vLLM's lazy exports). Imports in a ``try`` whose ``except`` catches
``ImportError`` are alternatives: one branch whose names all exist is enough.

``python -m vllm_miprun.tools.vllm_symbols SOURCE`` prints the result as JSON;
``scripts/check_vllm_release.py`` downloads a release's wheel and records it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_FOLDERS = ("vllm_miprun", "tests")
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class Requirement:
    """``module`` must exist and, unless ``name`` is None, define ``name``."""

    module: str
    name: str | None
    where: str  # "path:line" of the import
    group: str | None = None  # alternatives of one try/except ImportError
    branch: int = 0
    attribute: bool = False  # ``ALIAS.name``: checked only where ``module`` is a module

    @property
    def symbol(self) -> str:
        return self.module if self.name is None else f"{self.module}.{self.name}"


class SourceTree:
    """The ``vllm`` package's files in a folder or in a wheel (read only)."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        if self.source.is_file():
            with zipfile.ZipFile(self.source) as wheel:
                self._files = {name: wheel.read(name) for name in wheel.namelist()
                               if name.startswith("vllm/") and name.endswith(".py")}
        else:
            root = self.source
            self._files = {str(p.relative_to(root)): p.read_bytes() for p in (root / "vllm").rglob("*.py")}
        self._dirs = {str(Path(name).parent) for name in self._files}
        self._parsed: dict[str, ast.Module | None] = {}

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for name in (f"{base}.py", f"{base}/__init__.py"):
            if name in self._files:
                return name
        return None

    def is_package_dir(self, module: str) -> bool:  # a namespace folder without __init__.py
        return module.replace(".", "/") in self._dirs

    def tree(self, file: str) -> ast.Module | None:
        if file not in self._parsed:
            try:
                self._parsed[file] = ast.parse(self._files[file])
            except SyntaxError:
                self._parsed[file] = None
        return self._parsed[file]

    def defines(self, module: str, name: str | None) -> bool:
        file = self.module_file(module)
        if file is None:
            return name is None and self.is_package_dir(module)
        if name is None or self.module_file(f"{module}.{name}") or self.is_package_dir(f"{module}.{name}"):
            return True
        tree = self.tree(file)
        if tree is None:
            return False
        bound = set(top_level_names(tree.body))
        if name in bound:
            return True
        return "__getattr__" in bound and any(
            isinstance(node, ast.Constant) and node.value == name for node in ast.walk(tree))


def top_level_names(body: list[ast.stmt]) -> Iterator[str]:
    """Names a module body binds, in conditional and try blocks too (not inside functions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                yield (alias.asname or alias.name).split(".")[0]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        yield leaf.id
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in _blocks(node):
                yield from top_level_names(block)


def _blocks(node: ast.stmt) -> list[list[ast.stmt]]:
    blocks = [getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", [])]
    return blocks + [handler.body for handler in getattr(node, "handlers", [])]


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(kind, ast.Name) and kind.id in _IMPORT_ERRORS for kind in kinds):
            return True
    return False


def _branches(tree: ast.Module) -> dict[int, tuple[str, int]]:
    """{id of an import node: (group, branch)} for imports inside try/except ImportError."""
    placed: dict[int, tuple[str, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _catches_import_error(node):
            group = f"try@{node.lineno}"
            for branch, block in enumerate([node.body] + [h.body for h in node.handlers]):
                for stmt in block:
                    for inner in ast.walk(stmt):
                        if isinstance(inner, (ast.Import, ast.ImportFrom)):
                            placed.setdefault(id(inner), (group, branch))
    return placed


def file_requirements(path: Path, label: str) -> list[Requirement]:
    """The vLLM names one project file imports, and the attributes it reads off vLLM modules."""
    tree = ast.parse(path.read_text())
    placed = _branches(tree)
    found: list[Requirement] = []
    module_aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        group, branch = placed.get(id(node), (None, 0))
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
            for alias in node.names:
                found.append(Requirement(node.module, alias.name, f"{label}:{node.lineno}", group, branch))
                module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_vllm(alias.name):
                    found.append(Requirement(alias.name, None, f"{label}:{node.lineno}", group, branch))
                    if alias.asname:
                        module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            found.append(Requirement(module_aliases[node.value.id], node.attr, f"{label}:{node.lineno}",
                                     attribute=True))
    return found


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def project_requirements(root: Path, folders: Iterable[str] = PROJECT_FOLDERS) -> list[Requirement]:
    found: list[Requirement] = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            found.extend(file_requirements(path, str(path.relative_to(root))))
    return found


def check(tree: SourceTree, requirements: list[Requirement]) -> dict:
    """{"symbols": every required name, "missing": those the release lacks, with where they are used}.

    An attribute read off something imported counts only where that something is a module of
    the release (a class's or a function's attributes are not checked)."""
    missing: dict[str, list[str]] = {}
    branches: dict[str, dict[int, bool]] = {}
    checked = [req for req in requirements if not req.attribute or tree.module_file(req.module)]
    for req in checked:
        ok = tree.defines(req.module, req.name)
        if req.group is not None:
            outcome = branches.setdefault(f"{req.where.split(':')[0]}:{req.group}", {})
            outcome[req.branch] = outcome.get(req.branch, True) and ok
        elif not ok:
            missing.setdefault(req.symbol, []).append(req.where)
    for group, outcome in branches.items():
        if not any(outcome.values()):
            missing.setdefault(f"every branch of {group}", []).append(group)
    return {"symbols": sorted({req.symbol for req in checked}), "missing": dict(sorted(missing.items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_miprun.tools.vllm_symbols",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a vLLM wheel, or a folder holding the vllm package")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the project checkout (default: this one)")
    args = parser.parse_args(argv)
    result = check(SourceTree(args.source), project_requirements(args.root))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 1 if result["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
