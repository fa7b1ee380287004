"""Rewrite the README's option table from the option table in ``vllm_miprun/options.py``.

Usage: python scripts/options_table.py [--check]
With --check, change nothing and exit 1 when the README's table is out of date
(``tests/test_options.py`` runs the same comparison).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.option_flags import replace_readme_table  # noqa: E402


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = replace_readme_table(text)
    if "--check" in argv:
        if new != text:
            sys.stderr.write("README.md's option table is out of date; run python scripts/options_table.py\n")
            return 1
        return 0
    if new != text:
        readme.write_text(new, encoding="utf-8")
        sys.stdout.write("README.md: option table rewritten\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
