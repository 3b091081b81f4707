"""The README's scale-out route: data-parallel lmms-eval under `accelerate launch --num_processes N`.

Two CPU processes (gloo) on the bundled trained model must split the requests between them and give the same
per-sample answers, metrics and tokenzip statistics as one process.
Without lmms-eval these tests skip, unless TOKENZIP_REQUIRE_LMMS_EVAL=1 (CI sets it), where they fail instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("TOKENZIP_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (bash scripts/install-lmms-eval-cpu.sh)")

from tokenzip.evaluation import tasks_path

LIMIT = 16
MODEL_ARGS = "pretrained=synth-llava,policy=hiprune,keep=0.222"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmms_eval(launcher: list[str], out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [
        *launcher, "-m", "lmms_eval", "--model", "tokenzip_llava_hf", "--model_args", MODEL_ARGS,
        "--tasks", "tokenzip_synth", "--include_path", tasks_path(), "--limit", str(LIMIT), "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "ACCELERATE_USE_CPU": "1",  # gloo data parallelism on a machine without CUDA
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _samples(out: Path) -> dict[int, str]:
    files = list(out.rglob("*_samples_tokenzip_synth.jsonl"))
    assert len(files) == 1, files
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    return {r["doc_id"]: r["filtered_resps"] for r in rows}


def _metrics(out: Path) -> dict:
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["results"]["tokenzip_synth"]


def _stats(files: list[Path]) -> dict[int, dict]:
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    by_doc = {r["doc_id"]: r for r in rows}
    assert len(by_doc) == len(rows), "a request was evaluated twice"
    return by_doc


def test_two_processes_answer_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _lmms_eval([sys.executable], one, tmp_path)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    _lmms_eval(launch, two, tmp_path)

    # the requests were split between the ranks, each evaluated once
    ranks = sorted(two.glob("tokenzip_stats_rank*.jsonl"))
    assert [p.name for p in ranks] == ["tokenzip_stats_rank0.jsonl", "tokenzip_stats_rank1.jsonl"]
    per_rank = [len(p.read_text().splitlines()) for p in ranks]
    assert sum(per_rank) == LIMIT and min(per_rank) > 0
    assert not (two / "tokenzip_stats.jsonl").exists()

    # same per-sample answers, metrics and compression statistics as one process
    assert _samples(two) == _samples(one) and len(_samples(one)) == LIMIT
    m1, m2 = _metrics(one), _metrics(two)
    assert {k: v for k, v in m2.items() if k != "alias"} == {k: v for k, v in m1.items() if k != "alias"}
    s1, s2 = _stats([one / "tokenzip_stats.jsonl"]), _stats(ranks)
    assert s1.keys() == s2.keys() == set(range(LIMIT))
    fields = ("answer", "visual_in", "visual_llm_input", "visual_layer_mean", "prefill_flops", "flops_ratio")
    for doc in s1:
        assert {f: s1[doc][f] for f in fields} == {f: s2[doc][f] for f in fields}
