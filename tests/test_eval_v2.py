"""Evaluation side of synthetic data v2: the v2 lmms-eval tasks, task choice by a bundle's data version, and the
grid's oracle reference rows with every row's gap to them (no model runs here)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from tokenzip import assets
from tokenzip.evaluation import TASKS_DIR
from tokenzip.evaluation.grid import (
    ORACLE,
    GridRow,
    compare,
    data_version,
    default_task,
    markdown,
    task_mismatch,
    write,
)
from tokenzip.synthetic import CATEGORIES, SPLITS, VIDEO_FRAMES, VIDEO_SIDE, VIDEO_TEST, sample, video_sample
from tokenzip.synthetic.dataset import RENDER_SIDE

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / task / "test.jsonl").read_text().splitlines()]


def _utils(task: str) -> types.ModuleType:
    return _load(TASKS_DIR / task / "utils.py", f"_tokenzip_task_{task}_utils")


class _TagLoader(yaml.SafeLoader):
    """Reads lmms-eval task files: `!function x.y` becomes the string "!function x.y"."""


_TagLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(task: str) -> dict:
    return yaml.load((TASKS_DIR / task / f"{task}.yaml").read_text(), Loader=_TagLoader)


# -- the v2 tasks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("v2", "v1"), [("tokenzip_synth_v2", "tokenzip_synth"), ("tokenzip_synth_v2_video", None)])
def test_v2_task_files_mirror_v1(v2, v1):
    """Same output type, generation kwargs, hooks and metrics as the v1 task; only the name differs."""
    v1 = v1 or "tokenzip_synth_video"
    new, old = _yaml(v2), _yaml(v1)
    assert new.pop("task") == v2 and old.pop("task") == v1
    assert new == old


def test_v2_image_docs_are_balanced_and_match_the_generator():
    docs = _docs("tokenzip_synth_v2")
    assert len(docs) == SPLITS["test"] == 1200
    assert Counter(d["category"] for d in docs) == dict.fromkeys(CATEGORIES, 200)
    assert {d["version"] for d in docs} == {"v2"}
    assert [d["uid"] for d in docs] == [f"v2/test/{i}" for i in range(len(docs))]
    v1_uids = {d["uid"] for d in _docs("tokenzip_synth")}
    assert not v1_uids & {d["uid"] for d in docs}  # agreement answers of the two tasks never collide
    for doc in docs[::37]:
        q = sample(doc["split"], doc["index"], doc["seed"], version="v2").question
        assert (doc["question"], doc["answer"], doc["category"]) == (q.text, q.answer, q.category)


def test_v2_video_docs_are_balanced_and_match_the_generator():
    docs = _docs("tokenzip_synth_v2_video")
    assert len(docs) == VIDEO_TEST
    assert Counter(d["category"] for d in docs) == {"video_color": 100, "video_move": 100, "video_appear": 100}
    assert {(d["version"], d["frames"]) for d in docs} == {("v2", VIDEO_FRAMES)}
    assert [d["uid"] for d in docs] == [f"v2/video/test/{i}" for i in range(len(docs))]
    for doc in docs[::29]:
        clip = video_sample(doc["split"], doc["index"], doc["seed"], frames=(doc["frames"],) * 2, version="v2")
        assert (doc["question"], doc["answer"], doc["category"]) == (
            clip.question.text,
            clip.question.answer,
            clip.question.category,
        )


def test_task_files_are_what_the_generator_script_writes():
    """scripts/make_eval_tasks.py rebuilds the heads of all four files byte for byte (v1 files unchanged)."""
    script = _load(ROOT / "scripts" / "make_eval_tasks.py", "_make_eval_tasks")
    for task, (kind, version) in script.TASKS.items():
        docs = script.image_docs(version, n=13) if kind == "image" else script.video_docs(version, n=7)
        lines = (TASKS_DIR / task / "test.jsonl").read_text().splitlines()
        assert lines[: len(docs)] == [json.dumps(d) for d in docs], task
        assert ("version" in json.loads(lines[0])) == (version != "v1")


def test_v2_image_docs_render_deterministically_and_differ_from_v1():
    utils, v1_utils = _utils("tokenzip_synth_v2"), _utils("tokenzip_synth")
    for doc, v1_doc in list(zip(_docs("tokenzip_synth_v2"), _docs("tokenzip_synth")))[:6]:
        (first,), (again,) = utils.doc_to_visual(doc), utils.doc_to_visual(dict(doc))
        pixels = np.asarray(first)
        assert first.size == (RENDER_SIDE, RENDER_SIDE)
        assert np.array_equal(pixels, np.asarray(again))
        direct = sample("test", doc["index"], doc["seed"], version="v2").image(RENDER_SIDE)
        assert np.array_equal(pixels, np.asarray(direct))
        assert not np.array_equal(pixels, np.asarray(v1_utils.doc_to_visual(v1_doc)[0]))
        assert utils.doc_to_text(doc) == doc["question"]


def test_v2_video_docs_render_deterministically_and_differ_from_v1():
    utils, v1_utils = _utils("tokenzip_synth_v2_video"), _utils("tokenzip_synth_video")
    for doc, v1_doc in list(zip(_docs("tokenzip_synth_v2_video"), _docs("tokenzip_synth_video")))[:3]:
        (video,), (again,) = utils.doc_to_visual(doc), utils.doc_to_visual(dict(doc))
        frames = [np.asarray(f) for f in video.frames]
        assert len(frames) == VIDEO_FRAMES and frames[0].shape[:2] == (VIDEO_SIDE, VIDEO_SIDE)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, again.frames))
        clip = video_sample("test", doc["index"], doc["seed"], frames=(VIDEO_FRAMES,) * 2, version="v2")
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, clip.frames(VIDEO_SIDE)))
        old = v1_utils.doc_to_visual(v1_doc)[0].frames
        assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, old))


# -- task choice by the bundle's data version ---------------------------------------------------------------------


def _bundle(where: Path, version: str | None) -> Path:
    """A directory with the training.json of the bundled synth-llava, its config's data_version set (or absent)."""
    where.mkdir(parents=True, exist_ok=True)
    record = json.loads((assets.ROOT / "synth-llava" / "training.json").read_text())
    record["config"].pop("data_version", None)
    if version is not None:
        record["config"]["data_version"] = version
    (where / "training.json").write_text(json.dumps(record))
    return where


def test_default_task_follows_the_bundle_data_version(tmp_path):
    v2, v1, bare = _bundle(tmp_path / "v2", "v2"), _bundle(tmp_path / "v1", None), tmp_path / "bare"
    bare.mkdir()
    assert data_version(v2) == "v2" and data_version(v1) == "v1" and data_version(bare) is None
    assert data_version("some-org/some-hub-model") is None
    assert (default_task(v2), default_task(v2, video=True)) == ("tokenzip_synth_v2", "tokenzip_synth_v2_video")
    for other in (v1, bare, "some-org/some-hub-model"):
        assert (default_task(other), default_task(other, video=True)) == ("tokenzip_synth", "tokenzip_synth_video")
    for name in assets.names():  # the shipped bundles: whatever their training.json records
        recorded = json.loads((assets.ROOT / name / "training.json").read_text())["config"].get("data_version", "v1")
        assert default_task(name) == {"v1": "tokenzip_synth", "v2": "tokenzip_synth_v2"}[recorded]


def test_mismatched_task_is_a_warning_naming_the_right_task(tmp_path):
    v2, v1 = _bundle(tmp_path / "v2", "v2"), _bundle(tmp_path / "v1", "v1")
    assert "tokenzip_synth_v2" in task_mismatch(v2, "tokenzip_synth")
    assert "tokenzip_synth_v2_video" in task_mismatch(v2, "tokenzip_synth_video")
    assert "tokenzip_synth_video" in task_mismatch(v1, "tokenzip_synth_v2_video")
    assert task_mismatch(v2, "tokenzip_synth_v2") is None and task_mismatch(v1, "tokenzip_synth") is None
    assert task_mismatch(v2, "mmbench_en_dev") is None  # not a synthetic task: nothing to compare
    assert task_mismatch(tmp_path, "tokenzip_synth_v2") is None  # not a synthetic bundle


def test_unknown_data_version_is_a_clear_error(tmp_path):
    from tokenzip.errors import TokenzipError

    with pytest.raises(TokenzipError, match=r"'v9'.*\['v1', 'v2'\]"):
        default_task(_bundle(tmp_path / "v9", "v9"))


@pytest.fixture
def fake_grid(monkeypatch):
    """`tokenzip eval` without lmms-eval runs: run_grid records its task and returns fixed rows."""
    from tokenzip.evaluation import grid

    if importlib.util.find_spec("lmms_eval") is None:
        monkeypatch.setitem(sys.modules, "lmms_eval", types.ModuleType("lmms_eval"))
    calls: list[dict] = []

    def run_grid(**kwargs):
        calls.append(kwargs)
        return compare(_rows())

    monkeypatch.setattr(grid, "run_grid", run_grid)
    return calls


def _eval(args: list[str]):
    from typer.testing import CliRunner

    from tokenzip.cli import app

    result = CliRunner().invoke(app, ["eval", "--policies", "random", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_cli_picks_the_task_of_the_bundle_and_warns_on_a_mismatch(tmp_path, fake_grid):
    v2, v1 = _bundle(tmp_path / "v2", "v2"), _bundle(tmp_path / "v1", None)
    out = tmp_path / "out"
    output = _eval(["--model", str(v2), "--out", str(out)])
    assert fake_grid[-1]["task"] == "tokenzip_synth_v2" and "warning" not in output
    output = _eval(["--model", str(v1), "--out", str(out)])
    assert fake_grid[-1]["task"] == "tokenzip_synth" and "warning" not in output
    output = _eval(["--model", str(v2), "--task", "tokenzip_synth", "--out", str(out)])  # explicit --task wins
    assert fake_grid[-1]["task"] == "tokenzip_synth"
    assert "warning" in output and "tokenzip_synth_v2" in output
    output = _eval(["--model", str(v1), "--task", "tokenzip_synth_v2_video", "--out", str(out)])
    assert fake_grid[-1]["task"] == "tokenzip_synth_v2_video" and "warning" in output
    assert all(call["oracle"] for call in fake_grid) and fake_grid[-1]["policies"] == ["random"]
    _eval(["--model", str(v1), "--no-oracle", "--out", str(out)])
    assert fake_grid[-1]["oracle"] is False
    written = json.loads((out / "eval.json").read_text())
    assert [r["reference"] for r in written] == [r.policy == ORACLE for r in _rows()]


# -- oracle rows and gaps -----------------------------------------------------------------------------------------


def _row(policy: str, keep: float, accuracy: float, categories: dict[str, float], note: str = "") -> GridRow:
    nan = math.nan
    return GridRow(policy, keep, accuracy, nan, nan, 144.0, nan, nan, nan, 1.0, 6, categories, note=note)


def _rows() -> list[GridRow]:
    return [
        _row("none", 1.0, 0.8, {"color": 1.0, "ocr": 0.6}),
        _row(ORACLE, 0.111, 0.75, {"color": 0.9, "ocr": 0.6}),
        _row(ORACLE, 0.222, 0.8, {"color": 1.0, "ocr": 0.6}),
        _row("random", 0.111, 0.4, {"color": 0.5, "ocr": 0.3}),
        _row("random", 0.222, 0.85, {"color": 1.0, "ocr": 0.7}),  # beats the oracle: a negative gap
        _row("fastv", 0.111, math.nan, {}, note="fastv at layer 2 of 8: infeasible"),
        _row("pool", 0.333, 0.5, {"color": 0.5, "ocr": 0.5}),  # no oracle row at this keep
    ]


def test_compare_fills_retention_and_gaps_to_the_oracle_at_the_same_keep():
    none, o111, o222, r111, r222, fastv, pool = compare(_rows())
    assert [r.reference for r in (none, o111, o222, r111, r222, fastv, pool)] == [0, 1, 1, 0, 0, 0, 0]
    assert r111.retention == pytest.approx(0.4 / 0.8) and o111.retention == pytest.approx(0.75 / 0.8)
    assert none.retention == 1.0
    assert r111.oracle_gap == pytest.approx(35.0)  # points: 100 * (0.75 - 0.4)
    assert r111.oracle_gap_categories == pytest.approx({"color": 40.0, "ocr": 30.0})
    assert r222.oracle_gap == pytest.approx(-5.0) and r222.oracle_gap_categories == pytest.approx(
        {"color": 0.0, "ocr": -10.0}
    )
    for row in (none, o111, o222, pool):  # the references themselves, and a keep without a reference
        assert math.isnan(row.oracle_gap) and row.oracle_gap_categories == {}
    assert math.isnan(fastv.oracle_gap) and fastv.oracle_gap_categories == {}


def test_markdown_marks_the_oracle_as_reference_and_shows_every_gap(tmp_path):
    rows = compare(_rows())
    text = markdown(rows, "synth-llava on tokenzip_synth_v2")
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| policy | keep |"))
    labels = [c.strip() for c in head.strip("|").split("|")]
    assert labels[3:5] == ["retention", "gap to oracle (pts)"] and labels[-2:] == ["color", "ocr"]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    main = [r for r in table[: len(rows) + 1] if r[0] != "policy"]
    assert [r[0] for r in main] == [
        "none", "oracle (reference)", "oracle (reference)", "random", "random", "fastv", "pool",
    ]  # fmt: skip
    assert "not deployable" in main[1][labels.index("note")] and "not a deployable policy" in text.split("|")[0]
    gap = labels.index("gap to oracle (pts)")
    assert [r[gap] for r in main] == ["—", "—", "—", "+35.0", "-5.0", "—", "—"]
    assert "## Gap to oracle" in text
    gaps = {(r[0], r[1]): r[2:] for r in table[len(rows) + 1 :] if r[0] != "policy"}
    assert gaps == {
        ("random", "0.111"): ["0.500", "+35.0", "+40.0", "+30.0"],
        ("random", "0.222"): ["1.062", "-5.0", "+0.0", "-10.0"],
        ("fastv", "0.111"): ["—", "—", "—", "—"],
        ("pool", "0.333"): ["0.625", "—", "—", "—"],
    }
    write(rows, tmp_path, "synth-llava on tokenzip_synth_v2")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved[3]["oracle_gap"] == pytest.approx(35.0) and saved[3]["oracle_gap_categories"]["color"] == 40.0
    assert [r["reference"] for r in saved] == [False, True, True, False, False, False, False]
    assert (tmp_path / "eval.md").read_text() == text


def test_markdown_without_oracle_rows_keeps_the_old_layout():
    rows = compare([r for r in _rows() if r.policy != ORACLE])
    text = markdown(rows, "t")
    assert "## Gap to oracle" not in text and "(reference)" not in text
