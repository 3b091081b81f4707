"""`tokenzip.bench` and `tokenzip bench`: what each row measures is what it says.

Timings themselves are not asserted (no timed tests); the properties are: the oracle replays decisions without
running any scoring, FLOPs of a row equal the counted model FLOPs, keep-1.0 rows reproduce the unpatched
tokens, kept counts equal the budget, inputs built by hand match what the models expect, and bad requests fail
with messages naming what is allowed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict

import pytest
import torch
from conftest import get_tiny, image_inputs
from typer.testing import CliRunner

import tokenzip
from tokenzip.bench import BenchSettings, BenchSetupError, Workload, load_model, run_bench
from tokenzip.bench.inputs import synthetic_inputs
from tokenzip.bench.runner import generate
from tokenzip.bench.timing import PeakMemory, Summary, differs
from tokenzip.cli import app
from tokenzip.engine.accounting import measure_flops

FAST = dict(warmup=0, repeats=1, decode_tokens=2)


@pytest.fixture(scope="module")
def tiny_bench():
    return load_model("tiny-llava")


def test_rows_measure_what_they_claim(tiny_bench):
    settings = BenchSettings(["hiprune", "fastv", "pool"], [0.25, 1.0], **FAST)
    result = run_bench(tiny_bench, Workload(), settings)
    rows = {(r.policy, r.keep): r for r in result.rows}
    assert next(r.policy for r in result.rows) == "none" and len(result.rows) == 1 + 3 * 2
    assert all(r.error is None for r in result.rows)
    for row in result.rows:
        # the analytic FLOPs of the recorded prefill are what FlopCounterMode counted for the model
        assert row.flops["prefill"] == row.measured_model_flops
        assert row.ttft.n == row.oracle.n == 1 and row.ttft.median > 0 and row.oracle.median > 0
        assert row.vision.median > 0 and row.prefill.median >= 0
        assert 0 < row.decode_tps < float("inf")  # 2 decode steps after the first token, timed per step
    # keep = 1.0 changes nothing: same FLOPs, same greedy tokens as the unpatched model
    for policy in ("none", "hiprune", "fastv", "pool"):
        assert rows[(policy, 1.0)].flops_ratio == 1.0 and rows[(policy, 1.0)].agreement == 1.0
    hiprune = rows[("hiprune", 0.25)]
    assert hiprune.llm_input_tokens == 16 and hiprune.layer_mean_tokens == 16  # round(0.25 * 64)
    assert hiprune.flops_ratio < 0.5 and hiprune.flops["overhead"] > 0  # its attention recompute is counted
    assert rows[("pool", 0.25)].flops["overhead"] == 0  # pooling scores nothing
    fastv = rows[("fastv", 0.25)]
    assert fastv.llm_input_tokens == 64 and fastv.layer_mean_tokens == pytest.approx(16, abs=1)


def test_oracle_replay_runs_no_scoring():
    """The oracle (`Patch.replay`) reuses decisions: no signal, no policy call, not a single overhead FLOP."""
    vlm = get_tiny("llava")
    inputs = image_inputs(vlm, 2)
    for policy, keep in [("hiprune", 0.25), ("visiondrop", 0.25), ("fastv", 0.25), ("mustdrop", 0.333)]:
        with tokenzip.apply(vlm.model, policy, keep) as patch:
            scored = measure_flops(lambda: generate(vlm.model, inputs, 1))
            recorded = patch.stats.last
            with patch.replay():
                replayed = measure_flops(lambda: generate(vlm.model, inputs, 1))
                again = patch.stats.last
        assert scored.overhead > 0 and replayed.overhead == 0, policy
        assert replayed.model == scored.model, policy  # the same tokens at every layer
        assert again.width_per_layer == recorded.width_per_layer
        assert [s.visual_per_layer for s in again.samples] == [s.visual_per_layer for s in recorded.samples]


def test_stage_seconds_cover_the_policy_work():
    vlm = get_tiny("llava")
    inputs = image_inputs(vlm, 1)
    with tokenzip.apply(vlm.model, "hiprune", 0.25) as patch:
        generate(vlm.model, inputs, 1)
        seconds = patch.stats.last.seconds
    assert seconds["vision_encoder"] > 0 and seconds["vision_stage"] > 0  # HiPrune scores inside the tower
    assert seconds["pre_llm"] > 0
    with tokenzip.apply(vlm.model, "fastv", 0.25) as patch:
        generate(vlm.model, inputs, 1)
        seconds = patch.stats.last.seconds
    assert seconds["vision_stage"] == 0 and seconds["llm@2"] > 0 and seconds["llm_signals"] > 0


@pytest.mark.parametrize(
    ("family", "work"),
    [
        ("llava", Workload(images=2, text_tokens=7)),
        ("qwen2_5_vl", Workload(images=2, image_size=(112, 168))),
        ("qwen2_5_vl", Workload(frames=4, image_size=(112, 112))),
        ("llava_onevision", Workload(images=1, image_size=(100, 60))),
        ("llava_onevision", Workload(frames=3)),
        ("llava_next", Workload(images=2, image_size=(100, 60))),
        ("llava_next", Workload(images=1, image_size=(60, 170))),
    ],
)
def test_synthetic_inputs_are_what_the_model_expects(family, work):
    """Hand-built prompts carry exactly the placeholders the model fills; the patch sees the priced geometry."""
    vlm = get_tiny(family)
    batch = synthetic_inputs(vlm.model, work.images, work.image_size, work.frames, work.text_tokens, batch=2, seed=3)
    assert batch["input_ids"].shape[0] == 2
    with tokenzip.apply(vlm.model, "none", 1.0) as patch, torch.no_grad():
        logits = vlm.model(**batch).logits  # the model itself checks placeholders against its features
        record = patch.stats.last
    assert torch.isfinite(logits).all()
    from tokenzip.pricing import workload

    shapes = workload(vlm.model, work.images, work.image_size, work.frames, work.text_tokens).shapes
    for sample in record.samples:
        assert [it.tokens for it in sample.items] == [s.length for s in shapes]
        assert [it.content for it in sample.items] == [s.n_content for s in shapes]
    modality = "video" if work.frames else "image"
    assert all(it.modality == modality for it in record.samples[0].items)
    with pytest.raises(ValueError, match="at least one image"):
        synthetic_inputs(vlm.model, images=0)


def test_random_weights_real_shaped_model():
    bm = load_model("llava-onevision-qwen2-0.5b", random_weights=True, text_layers=2, vision_layers=1)
    assert bm.model.config.text_config.hidden_size == 896 and bm.model.config.text_config.num_hidden_layers == 2
    assert bm.model.config.vision_config.hidden_size == 1152
    work = Workload(images=1, image_size=(384, 384), text_tokens=20)
    result = run_bench(bm, work, BenchSettings(["pool"], [0.25], **FAST))
    base, pool = result.rows
    assert base.visual_tokens == 2 * 729 and pool.llm_input_tokens <= 0.25 * 2 * 729
    assert pool.flops["prefill"] == pool.measured_model_flops
    assert result.machine["dtype"] == "float32" and "torch" in result.machine


def test_pretrained_directory(tmp_path, tiny_bench):
    vlm = get_tiny("llava")
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    bm = load_model(str(tmp_path))
    assert bm.family == "llava"
    inputs = bm.make_inputs(Workload(images=1, batch=2))
    assert inputs["input_ids"].shape[0] == 2 and inputs["pixel_values"].shape[0] == 2
    assert torch.equal(generate(bm.model, inputs, 3), generate(vlm.model, inputs, 3))


@pytest.mark.parametrize("name", ["synth-qwen2_5_vl", "synth-llava_onevision"])
def test_bundled_qwen_and_onevision_models_get_a_processor_without_torchvision(name):
    """Their full processors need torchvision for video; the benchmark falls back to the image-only processor (what
    `load_vlm` builds), and without torchvision a video workload is refused with the reason."""
    import importlib.util

    from tokenzip.loading import load_vlm
    from tokenzip.tiny import dummy_image

    bm = load_model(name)
    work = Workload(images=1, batch=2, image_size=(96, 96))
    inputs = bm.make_inputs(work)
    _, processor = load_vlm(name)
    content = [{"type": "image"}, {"type": "text", "text": work.prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    expected = processor(text=[text], images=[dummy_image(96, 96, 0)], return_tensors="pt")
    for row in range(2):
        assert torch.equal(inputs["input_ids"][row], expected["input_ids"][0])
    assert torch.equal(inputs["pixel_values"][: len(expected["pixel_values"])], expected["pixel_values"])
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(BenchSetupError, match="video processor, which needs torchvision"):
            bm.make_inputs(Workload(frames=4))
    else:
        assert "pixel_values_videos" in bm.make_inputs(Workload(frames=4))


def _return_free_heap_to_the_os() -> None:
    """glibc's malloc_trim(0): release freed heap pages, so that RSS grows with the next allocation."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is not None and hasattr(ctypes.CDLL(name), "malloc_trim"):
        ctypes.CDLL(name).malloc_trim(0)


def test_summary_and_peak_memory():
    s = Summary.of([float(v) for v in range(10, 0, -1)])
    assert (s.median, s.p90, s.n) == (5.5, 9.0, 10)
    assert (s.q1, s.q3, s.min, s.max, s.spread) == (3.0, 8.0, 1.0, 10.0, 5.0)  # spread: the IQR from 4 repeats
    assert Summary.of([3.0, 1.0, 2.0]).spread == 2.0  # below 4 repeats: the full range
    one = Summary.of([2.0])
    assert one.p90 == 2.0 and one.spread != one.spread  # one run: no noise estimate (nan)
    _return_free_heap_to_the_os()  # else the block may reuse pages an earlier test freed but the process kept
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)  # the poller needs the GIL while the block is alive
        del block
    assert memory.added >= 48 * 2**20 and memory.peak >= memory.added


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "llava-1.5-7b"}, "--random-weights"),
        ({"name": "tiny-llava", "random_weights": True}, "built-in configs only"),
        ({"name": "gpt2-ish", "random_weights": True}, "needs a built-in config"),
        ({"name": "tiny-llava", "device": "cuda"}, "sees no CUDA device"),
        ({"name": "tiny-llava", "device": "tpu"}, "use cpu, cuda or cuda:N"),
        ({"name": "tiny-llava", "device": "meta"}, "use cpu or cuda"),
        ({"name": "tiny-llava", "dtype": "float8"}, "float32, bfloat16, float16"),
        ({"name": "tiny-llava", "attn": "magic"}, "sdpa, flash_attention_2, eager"),
        ({"name": "/no/such/dir"}, "no such local checkpoint directory"),
    ],
)
def test_setup_errors(kwargs, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the no-CUDA error, on any machine
    with pytest.raises(BenchSetupError, match=message.replace("-", r"\-")):
        load_model(**kwargs)


def test_refusing_policy_is_reported_not_fatal(tiny_bench):
    # HiPrune with an object layer beyond the tower refuses at apply time; the row carries the message
    settings = BenchSettings(["hiprune"], [0.25], options={"hiprune": {"object_layer": 99}}, **FAST)
    result = run_bench(tiny_bench, Workload(), settings)
    assert result.rows[1].error is not None and "object_layer" in result.rows[1].error


def test_bench_cli(tmp_path):
    out = tmp_path / "res"
    args = ["bench", "--policies", "pool,fastv", "--keeps", "0.25,16", "--repeats", "1", "--warmup", "0"]
    result = CliRunner().invoke(app, [*args, "--decode-tokens", "2", "--out", str(out), "-o", "fastv.layer=1"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["keep"]) for r in data["rows"]] == [
        ("none", 1.0),
        ("pool", 0.25),
        ("pool", 16),
        ("fastv", 0.25),
        ("fastv", 16),
    ]
    assert data["settings"]["options"] == {"fastv": {"layer": 1}}
    assert data["command"].startswith("tokenzip ") and data["machine"]["device"] == "cpu"
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 5
    md = (out / "results.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| policy")]
    assert [line.split(" | ")[:2] for line in rows] == [
        ["| none", "1.0"],
        ["| pool", "0.25"],
        ["| pool", "16"],
        ["| fastv", "0.25"],
        ["| fastv", "16"],
    ]
    assert all(line.count(" | ") == 12 for line in rows) and data["command"] in md[2]
    for name in ("quality_vs_flops.png", "ttft_vs_keep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "overhead" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nope"], "unknown policies"),
        (["--keeps", "0"], "keep"),
        (["--model", "llava-1.5-7b"], "--random-weights"),
        (["--repeats", "0"], "repeats"),
        (["--image-size", "big"], "448x448"),
        (["-o", "alpha=1"], "policy.key=value"),
    ],
)
def test_bench_cli_errors(args, message):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_accuracy_evaluator_with_other_prompts_leaves_the_oracle_intact():
    """The evaluator runs its own (differently shaped) prefills under each patch; the oracle must still replay the
    benchmark prompt's decisions, and every row gets the evaluator's accuracy."""
    bm = load_model("tiny-llava")
    vlm = get_tiny("llava", "sdpa")
    other = image_inputs(vlm, 2)
    seen = []

    def evaluator(model) -> float:
        with torch.no_grad():
            model(**other)
        seen.append(1)
        return 0.25 * len(seen)

    settings = BenchSettings(["hiprune", "pool"], [0.25], warmup=0, repeats=1, decode_tokens=1, count_flops=False)
    result = run_bench(bm, Workload(), settings, evaluator=evaluator)
    assert [r.error for r in result.rows] == [None, None, None]
    assert [r.accuracy for r in result.rows] == [0.25, 0.5, 0.75]
    assert all(r.oracle is not None and r.oracle.median > 0 for r in result.rows)


def test_bench_accuracy_needs_a_trained_model():
    result = CliRunner().invoke(app, ["bench", "--accuracy", "5", "--policies", "pool", "--keeps", "0.25"])
    assert result.exit_code != 0
    assert "--accuracy" in result.output and "synth-llava" in result.output


def test_noise_test_between_two_summaries():
    quiet = Summary.of([10.0, 10.1, 10.2, 10.3])
    assert differs(quiet, Summary.of([10.1, 10.2, 10.25, 10.4])) is False  # medians 0.075 apart, noise 0.15
    assert differs(quiet, Summary.of([12.0, 12.1, 12.2, 12.3])) is True
    assert differs(quiet, Summary.of([12.0])) is not None  # the other side's noise decides
    assert differs(Summary.of([1.0]), Summary.of([2.0])) is None  # no noise estimate at all


def test_rows_carry_budget_spread_and_the_control(tiny_bench):
    """Every row: its per-sample budget beside its layer average, TTFT quartiles, the overhead's noise verdict; the
    `none` row is the control and the header quotes it."""
    settings = BenchSettings(["pool", "fastv"], [0.25, 0.5], warmup=0, repeats=4, decode_tokens=1, count_flops=False)
    result = run_bench(tiny_bench, Workload(images=2), settings)
    rows = {(r.policy, r.keep): r for r in result.rows}
    assert result.control is result.rows[0] and result.control.policy == "none"
    assert rows[("none", 1.0)].budget_tokens == 2 * 64 and rows[("pool", 0.25)].budget_tokens == 2 * 16
    assert rows[("fastv", 0.5)].budget_tokens == 2 * 32
    for row in result.rows:
        assert row.error is None and not row.off_budget
        assert row.flags == [] or row.policy == "none"  # only the control row may carry a (control) flag
        assert row.ttft.n == 4 and row.ttft.q1 <= row.ttft.median <= row.ttft.q3
        assert row.overhead_resolved == differs(row.ttft, row.oracle)
    # the header's reference is the none row's own TTFT, in the same format as its cell
    from tokenzip.bench.report import interval, table

    rendered = _render(table(result))
    none_cell = interval(asdict(rows[("none", 1.0)].ttft))
    assert f"control (none, keep 1.0): TTFT {none_cell} ms" in rendered
    assert none_cell in rendered.split("control (none")[0]  # ... and it is the none row's cell


def _render(renderable) -> str:
    from rich.console import Console

    console = Console(width=400, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_control_row_is_flagged_when_its_runs_disagree(tiny_bench, monkeypatch):
    """The control (`none` vs its replay vs the hook-free model: the same work) is flagged when the medians lie
    further apart than their noise; here the hook-free timings are made to read 100 s more."""
    from tokenzip.bench import runner

    real = runner.timed
    calls = {"n": 0}

    def slow_first_runs(fn, device):
        calls["n"] += 1
        seconds, out = real(fn, device)
        return (seconds + 100.0 if calls["n"] <= 4 else seconds), out  # the 4 unpatched timings come first

    monkeypatch.setattr(runner, "timed", slow_first_runs)
    settings = BenchSettings(["pool"], [0.25], warmup=0, repeats=4, decode_tokens=1, count_flops=False)
    result = run_bench(tiny_bench, Workload(), settings)
    control = result.control
    assert result.unpatched_ttft.median > 100.0
    assert any(f.startswith("control: the model without hooks") for f in control.flags)
    assert result.rows[1].flags == []  # the pool row's own numbers are not the control's
    from tokenzip.bench.report import control_line

    assert "CONTROL OFF" in control_line(result.as_dict())


def test_off_budget_rows_are_marked_in_table_markdown_csv_and_plot(tiny_bench, tmp_path):
    """A sample more than one token per item from its budget is flagged (the check itself, on a real record with
    one layer count changed), and a flagged row says so in every output; the plots ring it in red."""
    import csv
    import dataclasses

    from tokenzip.bench.checks import budget_note, check_record, check_sample
    from tokenzip.bench.report import markdown, table, write

    vlm = get_tiny("llava")
    with tokenzip.apply(vlm.model, "pool", 0.25) as patch, torch.no_grad():
        vlm.model(**image_inputs(vlm, 1))
        record = patch.stats.last
    sample = record.samples[0]
    assert check_sample(0.25, sample).budget == 16 and not check_sample(0.25, sample).off
    layers = len(sample.visual_per_layer)
    near = dataclasses.replace(sample, visual_per_layer=[16] * (layers - 1) + [16 + layers])  # average 17: 1 off
    far = dataclasses.replace(sample, visual_per_layer=[16] * (layers - 1) + [16 + 2 * layers])  # average 18
    assert not check_sample(0.25, near).off and check_sample(0.25, far).off
    assert budget_note(check_record(dataclasses.replace(record, samples=[far]))) == (
        "off budget (layer avg: 18.0 vs budget 16)"
    )

    result = run_bench(tiny_bench, Workload(), BenchSettings(["pool"], [0.25, 0.5], **FAST, count_flops=False))
    clean = write(result, tmp_path / "clean", "tokenzip bench")
    row = result.rows[1]
    row.off_budget, row.flags = True, [budget_note([check_sample(0.25, far)])]
    paths = write(result, tmp_path / "off", "tokenzip bench")
    assert "OFF BUDGET" in _render(table(result)) and "off budget (layer avg: 18.0" in _render(table(result))
    md = markdown(json.loads((tmp_path / "off" / "results.json").read_text()))
    flagged = [line for line in md.splitlines() if line.startswith("| ") and "OFF BUDGET" in line]  # table rows
    assert len(flagged) == 1 and flagged[0].startswith("| pool | 0.25 |")
    with (tmp_path / "off" / "results.csv").open() as f:
        assert [r["off_budget"] for r in csv.DictReader(f)] == ["False", "True", "False"]
    for before, after in zip(clean[3:], paths[3:]):  # the two plots gain the red ring
        assert before.name == after.name and before.read_bytes() != after.read_bytes()
