"""The validity bars of the accuracy proxy (issue 20), on every bundled model, scored by the real lmms-eval.

At keep 0.111 the `oracle` reference selection (the tokens the question needs, from the generator's ground truth)
must keep at least 95 % of the unpruned accuracy, and `random` at most 70 %: a task a perfect selector cannot
answer from a ninth of the tokens, or that a random ninth answers, cannot rank policies. Measured here on the
first `QUESTIONS` test questions (equal numbers per category); the README gives the full-split figures
(`tokenzip eval`). All three bundles are v2 models; a v1 model (which predates the bars) would not be checked.

Without lmms-eval these tests skip, unless TOKENZIP_REQUIRE_LMMS_EVAL=1 (CI sets it), where they fail instead.
"""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("TOKENZIP_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (bash scripts/install-lmms-eval-cpu.sh)")

from tokenzip import assets
from tokenzip.evaluation.grid import run_grid

KEEP = 0.111
QUESTIONS = 240  # the test split cycles through the six categories: 40 each
ORACLE_BAR = 0.95  # oracle retention at KEEP: at least
RANDOM_BAR = 0.70  # random retention at KEEP: at most


def _v2(name: str) -> bool:
    report = json.loads((assets.path(name) / "training.json").read_text())
    return report["config"].get("data_version") == "v2"


@pytest.mark.parametrize("name", [n for n in assets.names() if _v2(n)])  # the v1 bundles predate the bars
def test_oracle_keeps_the_accuracy_and_random_does_not(name):
    rows = {r.policy: r for r in run_grid(pretrained=name, policies=["random"], keeps=[KEEP], limit=QUESTIONS)}
    assert set(rows) == {"none", "oracle", "random"}
    assert all(r.samples == QUESTIONS for r in rows.values())
    assert rows["oracle"].visual_layer_mean <= rows["oracle"].visual_budget + 1  # the oracle stays on budget
    oracle, random = rows["oracle"].retention, rows["random"].retention
    assert oracle >= ORACLE_BAR, f"{name}: oracle keeps {oracle:.1%} at keep {KEEP} (bar: at least {ORACLE_BAR:.0%})"
    assert random <= RANDOM_BAR, f"{name}: random keeps {random:.1%} at keep {KEEP} (bar: at most {RANDOM_BAR:.0%})"
