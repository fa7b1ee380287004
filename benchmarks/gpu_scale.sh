#!/usr/bin/env bash
# Issue 14's scale benchmark on one GPU, as ONE command for a session that the device tool
# lends a GPU (there: torch 2.11, transformers 5.17, no vLLM, no `datasets`).
#
# 1. Here (the host, which reaches the package registry), once, from the repository root:
#      echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#    (pure-Python wheels, under 1 MB; `datasets` is what vllm_miprun.pipeline.corpora imports).
# 2. The device call: run(command="bash benchmarks/gpu_scale.sh", carry=[".whl"], timeout_s=600)
#    It writes $OUT/scale_gpu.json and .png; commit them as benchmarks/results/scale_gpu.{json,png}.
#    SHAPE=llama-3.2-1b (or qwen2.5-7b, or llama-3.1-70b LAYERS=24) picks another shape.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 benchmarks/bench_scale.py --shape "${SHAPE:-llama-3.1-8b}" ${LAYERS:+--layers "$LAYERS"} --device cuda \
  --workdir /tmp --label after --out "$OUT/scale_gpu.json"
