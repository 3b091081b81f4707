"""The code's shape: adapters own the model quirks, engine modules stay small.

* No model-family branch outside `tokenzip/adapters/`: what a policy, a stage, pricing, drawing, loading or the
  bench needs from a family is an adapter method or a `ModelInfo` field.
* Every engine module stays under ~300 lines (one job each).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokenzip"
FAMILIES = r"(llava|qwen2_5_vl|llava_onevision)"
BRANCH = re.compile(  # a comparison with a family name, a membership test in a literal list of them, vision_kind
    rf"family\s*[!=]=\s*[\"']|[!=]=\s*[\"']{FAMILIES}[\"']|[\"']{FAMILIES}[\"']\s*[!=]="
    rf"|family\s+(not\s+)?in\s*[(\[{{]\s*[\"']|vision_kind"
)


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


OUTSIDE_ADAPTERS = [p for p in sorted(PACKAGE.rglob("*.py")) if "adapters" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("path", OUTSIDE_ADAPTERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_family_branch_outside_the_adapters(path):
    hits = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if BRANCH.search(line) and not line.lstrip().startswith("#")
    ]
    assert not hits, "family branches belong in tokenzip/adapters:\n" + "\n".join(hits)


def test_the_branch_pattern_catches_what_it_should():
    for line in (
        'if info.family == "llava":',
        "x = a if family != 'qwen2_5_vl' else b",
        'if family in ("llava", "llava_onevision"):',
        "if adapter.vision_kind:",
        'elif "qwen2_5_vl" == kind:',
    ):
        assert BRANCH.search(line), line
    for line in ('raise Error(f"not supported on {info.family}")', "if family != self.family:", "make = TABLE[family]"):
        assert not BRANCH.search(line), line


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
