"""Rewrite the option tables of README.md and docs/options.md from ``vllm_miprun/options.py``.

Usage: python scripts/options_table.py [--check]
With --check, change nothing and exit 1 when a table is out of date
(``tests/test_options.py`` runs the same comparison).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.option_flags import README_END, README_START, replace_readme_table  # noqa: E402

# The files that carry the generated table, relative to the repository root.
TABLE_FILES = ("README.md", "docs/options.md")
# Help texts link to a section by anchor (`(#healing)`); the tables live in several files,
# so each file's copy links to the page that holds that section instead.
SECTION_PAGES = {"#healing": "docs/healing.md"}


def updated(relative: str, text: str) -> str:
    """``text`` (the file ``relative``) with its option table regenerated and its links fixed."""
    new = replace_readme_table(text)
    start, end = new.index(README_START), new.index(README_END)
    table = new[start:end]
    here = (ROOT / relative).parent
    for anchor, page in SECTION_PAGES.items():
        table = table.replace(f"]({anchor})", f"]({Path(os.path.relpath(ROOT / page, here)).as_posix()})")
    return new[:start] + table + new[end:]


def main(argv: list[str]) -> int:
    stale = []
    for relative in TABLE_FILES:
        path = ROOT / relative
        text = path.read_text(encoding="utf-8")
        new = updated(relative, text)
        if new == text:
            continue
        stale.append(relative)
        if "--check" not in argv:
            path.write_text(new, encoding="utf-8")
            sys.stdout.write(f"{relative}: option table rewritten\n")
    if stale and "--check" in argv:
        sys.stderr.write(f"option table out of date in {', '.join(stale)}; run python scripts/options_table.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
