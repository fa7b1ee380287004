#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run every test tier.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not engine and not smollm2 and not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MIPRUN_HOME="${MIPRUN_HOME:-$HOME/.cache/vllm-miprun}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
