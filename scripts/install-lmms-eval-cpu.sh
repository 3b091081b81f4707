#!/usr/bin/env bash
# Install lmms-eval 0.7.3 into a venv WITHOUT replacing its CPU torch (a plain `pip install lmms-eval` pulls
# torchvision and with it a multi-GB CUDA torch). lmms-eval itself goes in with --no-deps, then the dependencies
# its evaluator and tasks import, minus torchvision / timm / opencv / decord / av (only needed by lmms-eval's
# built-in models and video loaders, not by tokenzip's models and tasks).
# Usage: bash scripts/install-lmms-eval-cpu.sh [path/to/venv]   (default: .venv)
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --no-deps lmms-eval==0.7.3
$PIP install --quiet "accelerate>=0.29.1" "datasets>=2.19.0" "evaluate>=0.4.0" "httpx>=0.23.3" jsonlines aiohttp \
  numexpr "numpy>=1.26.4" pytablewriter "sacrebleu>=1.5.0" "scikit-learn>=0.24.1" einops ftfy nltk sentencepiece \
  pycocoevalcap tqdm-multiprocess zstandard pillow pyyaml sympy latex2sympy2 mpmath Jinja2 openpyxl loguru \
  "tenacity>=8.3.0" "filelock<4" tiktoken pydantic packaging zss protobuf python-dotenv math-verify openai peft wandb==0.25.0
"$VENV/bin/python" -c "import torch, lmms_eval.evaluator; print('lmms-eval ready; torch', torch.__version__)"
