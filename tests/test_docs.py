"""The README and docs/ stay true: its two commands exist, and every relative link resolves.

Pure file checks: no model, no engine.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_COMMANDS = ("bash scripts/demo.sh", "bash scripts/test.sh")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def documentation_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown page (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``page`` whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
            continue
        if anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


def test_readme_commands_exist_as_written():
    text = README.read_text(encoding="utf-8")
    for command in README_COMMANDS:
        assert re.search(rf"^{re.escape(command)}(\s|$)", text, re.MULTILINE), f"README lost `{command}`"
        script = ROOT / command.split()[1]
        assert script.is_file(), f"README runs {command}, but {script} does not exist"


def test_readme_is_a_front_door():
    assert README.stat().st_size <= 12_000, "README.md grew past 12 KB; move detail into docs/"


@pytest.mark.parametrize("page", documentation_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    """The check can fail: a dead file link and a dead anchor are both reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The `vllm` command\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#the-vllm-command) [self](#top) [gone](docs/b.md) "
                    "[bad anchor](docs/a.md#nowhere) `[code](ignored.md)` [web](https://x.org/y)\n"
                    "\n\n# Top\n", encoding="utf-8")
    assert broken_links(page, root=tmp_path) == [
        "docs/b.md (no such file)", "docs/a.md#nowhere (no heading #nowhere in a.md)"]


def test_heading_anchors_follow_github():
    text = "# Quality on SmolLM2-135M: every method\n## Options\n## Options\n```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"quality-on-smollm2-135m-every-method", "options", "options-1"}
