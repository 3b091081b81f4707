"""Trained tiny VLMs bundled with the package (weights, tokenizer and processor files; no download).

    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(tokenzip.assets.path("synth-llava"))

or, with the right processor for every family (Qwen2.5-VL and OneVision get an image-only processor when
torchvision is missing): `tokenzip.loading.load_vlm("synth-llava")`.

Each directory holds `training.json` with the command, the training time and the per-category accuracy
measured on the synthetic test split.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
FAMILY_OF = {"synth-llava": "llava", "synth-qwen2_5_vl": "qwen2_5_vl", "synth-llava_onevision": "llava_onevision"}


def names() -> list[str]:
    """The bundled models present in this installation."""
    return [name for name in FAMILY_OF if (ROOT / name / "config.json").is_file()]


def path(name: str) -> Path:
    """Directory of bundled model `name`, usable with `from_pretrained`."""
    if name not in FAMILY_OF:
        raise ValueError(f"unknown bundled model {name!r}; known names: {list(FAMILY_OF)}, present: {names()}")
    where = ROOT / name
    if not (where / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} is not in this installation ({where}); present: {names()}. "
            f"Train it with `python -m training.train --family {FAMILY_OF[name]} --out {where}`."
        )
    return where


__all__ = ["FAMILY_OF", "ROOT", "names", "path"]
