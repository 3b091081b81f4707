"""Scoring patched models with the real lmms-eval (optional extra `tokenzip[eval]`).

* `manifests`: the `lmms_eval.models` entry points `tokenzip_llava_hf`, `tokenzip_qwen2_5_vl`,
  `tokenzip_llava_onevision` (see pyproject.toml).
* `lmms_model`: the lmms-eval model class (batched greedy generation under a tokenzip patch, per-sample visual
  token counts and FLOPs, answers of the unpatched model for the agreement metric).
* `tasks/`: the local tasks `tokenzip_synth` (images), `tokenzip_synth_video` and their dataset-v2 twins
  `tokenzip_synth_v2`, `tokenzip_synth_v2_video` for `--include_path` (`tasks_path()`).
* `grid`: `tokenzip eval`, a policy x keep grid through lmms-eval in one process.

Importing this package does not import lmms-eval.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def tasks_path() -> str:
    """The directory to pass to lmms-eval's `--include_path` for tokenzip's local tasks."""
    return str(TASKS_DIR)


__all__ = ["TASKS_DIR", "tasks_path"]
