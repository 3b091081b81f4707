#!/usr/bin/env bash
# CPU time-to-first-token of every policy on a real-shaped, random-weight LLaVA-OneVision-0.5B
# (SigLIP-so400m tower, 26 layers; Qwen2-0.5B LLM, 24 layers), one 384x384 image (base + one anyres tile,
# 1458 visual tokens), keep 0.111 / 0.222 / 0.333. No download: the model is built from the built-in config.
# Results: benchmarks/results/cpu-llava-onevision-qwen2-0.5b/ (results.json has the machine description).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/tokenzip bench \
  --model llava-onevision-qwen2-0.5b --random-weights \
  --image-size 384x384 --warmup 0 --repeats 3 --decode-tokens 8 \
  --out benchmarks/results/cpu-llava-onevision-qwen2-0.5b "$@"
