#!/usr/bin/env bash
# GPU serving benchmark (issue 3): the service on CUDA under load, next to the model alone and
# to batching off, with one and with two server processes.
#
# On the development machine first (the GPU machine has no network and none of the web stack;
# .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-multipart \
#     annotated-types typing-inspection python-dotenv annotated-doc anyio idna click h11 httptools \
#     uvloop prometheus-client opentelemetry-api typing-extensions
# then through the device tool, with carry [".whl"]:
#   bash bench/gpu_serving.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
# Two files back (the device tool returns at most 8 with gpu_session's): the table with the device
# on top, and the JSON.
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu-serving.txt"
# The load generator shares the host's 16 cores with the server; it is a light asyncio client.
# About 5 minutes: 3 configurations x 5 levels x 2 rounds of 3 s load + 0.5 s per model batch
# size; ROUNDS=1 halves it. WORKERS: the process counts to try (1,2). DECODE_THREADS:
# --decode-threads of the server (default: one per core). CHECKPOINT: what to serve (default
# weights/; a training last.pt serves at the same speed: the artifact is dequantized at load).
python3 -m bench.serve_load --device cuda --rounds "${ROUNDS:-2}" --seconds 3 --warmup 1 --round-warmup 0.5 \
  --model-seconds 0.5 --concurrency 1,8,32,64,128 --model-batches 1,8,32,64 --max-batch-size 64 \
  --checkpoint "${CHECKPOINT:-weights}" --workers "${WORKERS:-1,2}" \
  ${DECODE_THREADS:+--decode-threads "$DECODE_THREADS"} --json-out "$OUT/gpu-serving.json" 2>&1 \
  | tee -a "$OUT/gpu-serving.txt"
