"""The lmms-eval plug-in, run by the real lmms-eval (installed with scripts/install-lmms-eval-cpu.sh).

Without lmms-eval these tests skip, unless TOKENZIP_REQUIRE_LMMS_EVAL=1 (CI sets it), where they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("TOKENZIP_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (bash scripts/install-lmms-eval-cpu.sh)")

from tokenzip.evaluation import tasks_path
from tokenzip.synthetic import sample
from tokenzip.synthetic.dataset import RENDER_SIDE
from tokenzip.synthetic.evaluate import answers as direct_answers
from training.architectures import build

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained synthetic LLaVA saved like the bundled models (mechanics do not need trained weights)."""
    where = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    model, processor = build("llava")
    model.save_pretrained(where)
    processor.save_pretrained(where)
    return str(where)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hfhome"))


def evaluate(model, limit: int, batch_size: int = 1) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        tasks=["tokenzip_synth"],
        task_manager=TaskManager("WARNING", include_path=tasks_path()),
        batch_size=batch_size,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    return {k.split(",")[0]: v for k, v in out["results"]["tokenzip_synth"].items() if "," in k}


def test_entry_points_resolve_to_the_model_classes():
    from lmms_eval.models import get_model

    from tokenzip.adapters import ADAPTERS
    from tokenzip.evaluation.lmms_model import CLASSES, MODEL_NAMES

    assert set(CLASSES) == set(MODEL_NAMES) == {a.family for a in ADAPTERS}  # every family has its model name
    for family, name in MODEL_NAMES.items():
        assert get_model(name) is CLASSES[family]


def test_a_family_without_a_synthetic_bundle_runs_batched_like_batch_of_one(tmp_path):
    """Qwen2-VL (no synthetic architecture of its own): the tiny model saved with its processor, loaded by its
    lmms-eval model name, scores a batch of 3 exactly like 3 batches of one, with the budget met."""
    from tokenzip.evaluation.lmms_model import CLASSES
    from tokenzip.tiny import tiny

    vlm = tiny("qwen2_vl")
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    runs = {}
    for batch_size in (1, 3):
        model = CLASSES["qwen2_vl"](pretrained=str(tmp_path), policy="hiprune", keep=0.25, batch_size=batch_size)
        evaluate(model, limit=3, batch_size=batch_size)
        runs[batch_size] = {r["uid"]: r for r in model.sample_stats}
    assert runs[1].keys() == runs[3].keys() and len(runs[1]) == 3
    assert [runs[1][u]["answer"] for u in runs[1]] == [runs[3][u]["answer"] for u in runs[1]]
    for row in runs[1].values():
        assert row["visual_layer_mean"] == pytest.approx(0.25 * row["visual_in"], abs=1.0)


def test_unpatched_scores_equal_direct_generation(checkpoint):
    from tokenzip.evaluation.lmms_model import TokenzipLlava

    model = TokenzipLlava(pretrained=checkpoint, policy="none", batch_size=4, agreement=True)
    model.persistent = True  # keep the weights after lmms-eval's clean() for the direct comparison
    metrics = evaluate(model, limit=12, batch_size=4)
    docs = [sample("test", i) for i in range(12)]
    direct = direct_answers(
        model.model, model.processor, "llava", [d.image(RENDER_SIDE) for d in docs], [d.question.text for d in docs],
        max_new_tokens=4,
    )  # fmt: skip
    got = {row["doc_id"]: row["answer"].split()[0] if row["answer"] else "" for row in model.sample_stats}
    assert [got[i] for i in range(12)] == direct
    assert metrics["exact_match"] == pytest.approx(sum(a == d.question.answer for a, d in zip(direct, docs)) / 12)
    assert metrics["agreement"] == 1.0
    assert all(row["flops_ratio"] == 1.0 and row["visual_llm_input"] == 144 for row in model.sample_stats)


@pytest.mark.parametrize(("policy", "keep"), [("hiprune", 0.222), ("fastv", 0.333), ("atp", 0.333)])
def test_batched_equals_batch_of_one_and_stats_follow_the_budget(checkpoint, policy, keep):
    from tokenzip.evaluation.lmms_model import TokenzipLlava

    runs = {}
    for batch_size in (1, 4):
        model = TokenzipLlava(pretrained=checkpoint, policy=policy, keep=keep, batch_size=batch_size, agreement=True)
        metrics = evaluate(model, limit=8, batch_size=batch_size)
        runs[batch_size] = ({r["uid"]: r for r in model.sample_stats}, metrics)
    one, four = runs[1][0], runs[4][0]
    assert one.keys() == four.keys() and len(one) == 8
    assert [one[u]["answer"] for u in one] == [four[u]["answer"] for u in one]
    assert runs[1][1] == runs[4][1]
    budget = round(keep * 144)
    for row in one.values():
        assert row["visual_in"] == 144
        assert row["visual_layer_mean"] == pytest.approx(budget, abs=1.0)
        assert 0 < row["flops_ratio"] < 1
    agreement = sum(r["answer"].split()[:1] == r["unpatched_answer"].split()[:1] for r in one.values()) / 8
    assert runs[1][1]["agreement"] == pytest.approx(agreement)


def test_wrong_family_and_bad_policy_are_refused(checkpoint):
    from tokenzip import UnknownPolicyError
    from tokenzip.evaluation.lmms_model import TokenzipLlava, TokenzipQwen2_5_VL

    with pytest.raises(ValueError, match="tokenzip_llava_hf"):
        TokenzipQwen2_5_VL(pretrained=checkpoint)
    with pytest.raises(UnknownPolicyError):
        TokenzipLlava(pretrained=checkpoint, policy="nope")


def test_lmms_eval_cli_end_to_end(checkpoint, tmp_path):
    """`python -m lmms_eval` on a saved checkpoint directory, one policy, --limit 40 (what CI runs)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "tokenzip_llava_hf",
        "--model_args", f"pretrained={checkpoint},policy=hiprune,keep=0.222,agreement=true",
        "--tasks", "tokenzip_synth", "--include_path", tasks_path(), "--limit", "40", "--batch_size", "8",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1
    metrics = json.loads(results[0].read_text())["results"]["tokenzip_synth"]
    assert {"exact_match,none", "agreement,none", "acc_ocr,none"} <= metrics.keys()
    stats = [json.loads(line) for line in (out / "tokenzip_stats.jsonl").read_text().splitlines()]
    assert len(stats) == 40 and {r["visual_llm_input"] for r in stats} == {32}
    hits = sum(r["answer"] == sample("test", r["doc_id"]).question.answer for r in stats)
    assert metrics["exact_match,none"] == pytest.approx(hits / 40)


def test_eval_grid_rows_and_cli(checkpoint, tmp_path):
    """`tokenzip eval`: unpatched row first (retention 1, agreement 1), then the oracle reference at every keep,
    pruned rows carry their budgets and their gap to the oracle at their keep, a keep a policy cannot reach on this
    8-layer LLM becomes a row with a note instead of an abort."""
    import math

    from typer.testing import CliRunner

    from tokenzip.cli import app
    from tokenzip.evaluation.grid import run_grid

    rows = run_grid(pretrained=checkpoint, policies=["pool", "fastv"], keeps=[0.111, 0.3], limit=6, batch_size=3)
    assert [(r.policy, r.keep) for r in rows] == [
        ("none", 1.0), ("oracle", 0.111), ("oracle", 0.3), ("pool", 0.111), ("pool", 0.3), ("fastv", 0.111),
        ("fastv", 0.3),
    ]  # fmt: skip
    none, oracle_111, oracle_30, pool_111, pool_30, fastv_111, fastv_30 = rows
    assert [r.reference for r in rows] == [False, True, True, False, False, False, False]
    assert oracle_111.samples == 6 and oracle_111.visual_llm_input <= 16 and oracle_30.visual_llm_input <= 43
    assert pool_30.oracle_gap == pytest.approx(100 * (oracle_30.accuracy - pool_30.accuracy))
    assert math.isnan(fastv_111.oracle_gap)
    # retention = accuracy / unpruned accuracy (undefined for this untrained model, whose accuracy is 0)
    assert none.retention == 1.0 if none.accuracy else math.isnan(none.retention)
    assert none.agreement == 1.0 and none.flops_ratio == 1.0
    assert none.visual_llm_input == 144 and none.samples == 6
    assert pool_30.visual_llm_input <= 43 and pool_30.flops_ratio < 1
    assert pool_111.visual_llm_input <= 16 and pool_111.flops_ratio < pool_30.flops_ratio
    assert 0 <= pool_30.agreement <= 1 and set(pool_30.categories) <= {
        "color",
        "shape",
        "count",
        "exists",
        "position",
        "ocr",
    }
    assert "infeasible" in fastv_111.note and math.isnan(fastv_111.accuracy)
    assert fastv_30.visual_layer_mean == pytest.approx(0.3 * 144, abs=1)

    out = tmp_path / "grid"
    args = ["eval", "--model", checkpoint, "--policies", "pool", "--keeps", "0.25", "--limit", "6", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (out / "eval.md").read_text().splitlines()
    assert sum(line.startswith("| none") or line.startswith("| pool") for line in table) == 3  # pool: gap table too
    assert sum(line.startswith("| oracle (reference)") for line in table) == 1
    assert len(json.loads((out / "eval.json").read_text())) == 3


@pytest.fixture(scope="module")
def video_checkpoints(tmp_path_factory):
    """Untrained synthetic Qwen2.5-VL and OneVision saved like the bundled models."""
    out = {}
    for family in ("qwen2_5_vl", "llava_onevision"):
        where = tmp_path_factory.mktemp(family)
        torch.manual_seed(1)
        model, processor = build(family)
        model.save_pretrained(where)
        processor.save_pretrained(where)
        out[family] = str(where)
    return out


# visual tokens of one 8-frame clip at 224 px: Qwen 4 temporal patches x 8x8 merged; OneVision 8 frames x 3x3
# pooled (its trailing newline token is layout, not content, and is always kept)
VIDEO_TOKENS = {"qwen2_5_vl": 4 * 64, "llava_onevision": 8 * 9}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_task_runs_batched_like_batch_of_one(video_checkpoints, family):
    """`tokenzip_synth_video` through lmms-eval: frames become video inputs without a video processor, a batch of
    3 answers like 3 batches of one, and the stats count the clip's visual tokens and the budget."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokenzip.evaluation.lmms_model import CLASSES

    runs = {}
    for batch_size in (1, 3):
        model = CLASSES[family](
            pretrained=video_checkpoints[family], policy="holitom", keep=0.25, batch_size=batch_size, agreement=True
        )
        out = simple_evaluate(
            model=model,
            tasks=["tokenzip_synth_video"],
            task_manager=TaskManager("WARNING", include_path=tasks_path()),
            batch_size=batch_size,
            limit=3,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="WARNING",
        )
        metrics = {k.split(",")[0]: v for k, v in out["results"]["tokenzip_synth_video"].items() if "," in k}
        runs[batch_size] = ({r["uid"]: r for r in model.sample_stats}, metrics)
    one, three = runs[1][0], runs[3][0]
    assert one.keys() == three.keys() == {f"video/test/{i}" for i in range(3)}
    assert [one[u]["answer"] for u in one] == [three[u]["answer"] for u in one]
    assert runs[1][1] == runs[3][1]
    assert {"exact_match", "agreement", "acc_video_color", "acc_video_move", "acc_video_appear"} <= runs[1][1].keys()
    for row in one.values():
        assert row["visual_in"] == VIDEO_TOKENS[family]
        assert row["visual_llm_input"] < row["visual_in"] and 0 < row["flops_ratio"] < 1
