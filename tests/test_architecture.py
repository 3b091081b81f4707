"""The code's shape: adapters own the model quirks, engine modules stay small.

* No model-family or vision-kind branch in the engine or the policies: what a policy or stage needs from a
  family is an adapter method or a `ModelInfo` field.
* Every engine module stays under ~300 lines (one job each).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokenzip"
BRANCH = re.compile(
    r"\bfamily\s*(==|!=|\bin\b|\bnot in\b)|vision_kind|==\s*[\"'](llava|qwen2_5_vl|llava_onevision)[\"']"
)
CHECKED = ("engine", "policies", "pricing.py", "viz.py")  # the rest of the package: issue 21, next slice


def modules(where: str) -> list[Path]:
    path = PACKAGE / where
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("path", [p for f in CHECKED for p in modules(f)], ids=lambda p: p.name)
def test_no_family_branch_outside_the_adapters(path):
    hits = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if BRANCH.search(line) and not line.lstrip().startswith("#")
    ]
    assert not hits, "family branches belong in tokenzip/adapters:\n" + "\n".join(hits)


def test_the_branch_pattern_catches_what_it_should():
    for line in ('if info.family == "llava":', "x = a if family != 'qwen2_5_vl' else b", "if adapter.vision_kind:"):
        assert BRANCH.search(line), line
    assert not BRANCH.search('raise Error(f"not supported on {info.family}")')


@pytest.mark.parametrize("path", modules("engine"), ids=lambda p: p.name)
def test_engine_modules_are_small(path):
    assert len(path.read_text().splitlines()) <= 310, f"{path.name}: split it (one job per module)"


def test_the_package_does_not_depend_on_the_training_code():
    hits = [
        f"{p.relative_to(PACKAGE)}:{n}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.match(r"\s*(from training\b|import training\b)", line)
    ]
    assert not hits, "tokenzip/ must not import training/ (it is not installed): " + ", ".join(hits)
