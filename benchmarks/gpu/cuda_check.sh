#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (about 5 minutes on one H200):
#  1. tests/test_cuda.py: on the GPU every policy keeps the same indices and generates the same tokens as on the CPU
#     (float32), cached generation equals recomputation (bfloat16), keep=1.0 is exact, a batch equals its samples;
#  2. time-to-first-token per stage, FLOPs and memory of every policy on real-shaped 7B models (random weights built
#     from the built-in configs, so nothing is downloaded), bfloat16, sdpa, one image, batch 1 and batch 8.
# Usage: bash benchmarks/gpu/cuda_check.sh OUTDIR [MODEL ...]   (default models: llava qwen onevision;
#        PYTHON=... picks the interpreter, which must import tokenzip and transformers >= 5.20)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-gpu-results}
shift || true
MODELS=${*:-llava qwen onevision}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

$PY -m pytest tests/test_cuda.py -o addopts="" -q -n 4 -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/test_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # tag, model, extra options...
  local tag=$1 name=$2
  shift 2
  $PY -m tokenzip.cli bench --model "$name" --random-weights --device cuda --dtype bfloat16 --attn sdpa \
    --keeps 0.111,0.222,0.333 --warmup 2 --repeats 5 --decode-tokens 16 --out "$OUT/$tag" "$@" >"$OUT/$tag.txt" 2>&1 \
    || status=1
  tail -40 "$OUT/$tag.txt"
}
for model in $MODELS; do
  case $model in
    llava) bench llava-1.5-7b llava-1.5-7b && bench llava-1.5-7b-b8 llava-1.5-7b --batch 8 ;;
    qwen) bench qwen2.5-vl-7b qwen2.5-vl-7b --image-size 672x672 ;;
    onevision) bench llava-onevision-qwen2-7b llava-onevision-qwen2-7b --image-size 384x384 ;;
    *) echo "unknown model $model (llava, qwen or onevision)" && status=1 ;;
  esac
done
exit $status
