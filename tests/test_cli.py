"""The `tokenzip` command line: one meaning for -o, --version, progress that shows off a terminal, `show`'s answer,
counts and labelled figure, and every example of README.md run as written on the bundled / tiny models."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import tokenzip
from tokenzip.cli import RunProgress, app

README = Path(__file__).resolve().parents[1] / "README.md"


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"tokenzip {shlex.join(args)}\n{result.output}\n{result.exception!r}"
    return result


def test_version():
    result = invoke(["--version"])
    assert result.output.strip() == f"tokenzip {tokenzip.__version__}"


@pytest.mark.parametrize("command", ["flops", "bench", "eval", "show"])
def test_minus_o_is_the_policy_option_in_every_subcommand(command):
    text = invoke([command, "--help"]).output
    assert re.search(r"--option\s+-o\b", text), text
    assert re.search(r"--out\b", text) or command == "flops"


def test_flops_and_show_take_both_option_forms_and_explain_o(tmp_path):
    plain = json.loads(invoke(["flops", "--policy", "fastv", "--keep", "0.5", "-o", "layer=3", "--json"]).output)
    dotted = json.loads(invoke(["flops", "--policy", "fastv", "--keep", "0.5", "-o", "fastv.layer=3", "--json"]).output)
    default = json.loads(invoke(["flops", "--policy", "fastv", "--keep", "0.5", "--json"]).output)
    assert plain == dotted and plain["policy_flops"] != default["policy_flops"]  # the option took effect
    wrong = CliRunner().invoke(app, ["flops", "--policy", "fastv", "-o", "hiprune.alpha=0.2"])
    assert wrong.exit_code != 0 and "names policy 'hiprune'" in wrong.output
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    old_habit = CliRunner().invoke(app, ["show", "--image", str(image), "-o", str(tmp_path / "kept.png")])
    assert old_habit.exit_code != 0 and "the output file is --out" in old_habit.output


def test_progress_plain_lines_off_a_terminal_and_a_bar_on_one():
    plain = io.StringIO()
    with RunProgress(2, "job", Console(file=plain, force_terminal=False, width=200)) as progress:
        progress.advance("pool keep=0.25", "layer avg 16.0 / budget 16")
        progress.advance("fastv keep=0.5")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "job: 2 runs"
    assert re.fullmatch(r"\[1/2\] pool keep=0\.25: layer avg 16\.0 / budget 16 \(\d+ s\)", lines[1])
    assert re.fullmatch(r"\[2/2\] fastv keep=0\.5 \(\d+ s\)", lines[2])
    tty = io.StringIO()
    with RunProgress(2, "job", Console(file=tty, force_terminal=True, width=200)) as progress:
        progress.advance("pool keep=0.25", "detail")
    assert "[1/2]" not in tty.getvalue() and "\x1b[" in tty.getvalue()  # rich's live bar, not the plain lines


def test_bench_prints_a_line_per_row_when_not_a_terminal(tmp_path):
    args = ["bench", "--policies", "pool", "--keeps", "0.25", "--repeats", "1", "--warmup", "0"]
    output = invoke([*args, "--decode-tokens", "1", "--no-flops-count", "--out", str(tmp_path)]).output
    assert "tokenzip bench tiny-llava: 2 runs" in output
    assert re.search(r"\[1/2\] none keep=1\.0: layer avg 64\.0 / budget 64, TTFT [\d.]+ ms", output)
    assert re.search(r"\[2/2\] pool keep=0\.25: layer avg 16\.0 / budget 16, ", output)
    # the header's timing reference is the none row's own TTFT
    data = json.loads((tmp_path / "results.json").read_text())
    none = data["rows"][0]
    assert f"control (none, keep 1.0): TTFT {none['ttft']['median'] * 1e3:.1f} ms" in output


@pytest.mark.parametrize(
    ("model", "labels"), [("tiny-llava", ["image"]), ("tiny-llava_onevision", None), ("tiny-llava_next", None)]
)
def test_show_prints_answer_and_counts_and_writes_a_labelled_figure(tmp_path, model, labels):
    from tokenzip.tiny import dummy_image
    from tokenzip.viz import panel_labels

    image = tmp_path / "img.png"
    dummy_image(200, 120, 0).save(image)
    out = tmp_path / "fig.png"
    args = ["show", "--model", model, "--image", str(image), "--policy", "pool", "--keep", "0.25", "--out", str(out)]
    output = invoke(args).output
    assert re.search(r"^answer \(pool, keep=0\.25\): .*$", output, re.M)
    counts = re.findall(r"^image 0: (\d+) of (\d+) visual tokens enter the LLM$", output, re.M)
    assert len(counts) == 1
    kept, content = map(int, counts[0])
    assert kept == max(1, round(0.25 * content))
    assert f"layer-averaged visual tokens {kept:.1f}, budget {kept}" in output
    picture = Image.open(out)
    assert picture.width >= 512 and picture.height >= 256
    if labels is None:  # OneVision / LLaVA-NeXT anyres: the base image, then the high-resolution tiles
        from tokenzip.tiny import tiny

        vlm = tiny(model.removeprefix("tiny-"))
        with tokenzip.apply(vlm.model, "pool", 0.25) as patch:
            vlm.model(**vlm.inputs([Image.open(image)], vlm.prompt("What is in the image ?")))
            item = patch.stats.last.samples[0].items[0]
        assert panel_labels(vlm.model, item) == ["base image", "high-res tiles"]


# ---------------------------------------------------------------------------------------------------------------
# README.md, every example


def _blocks(language: str) -> list[tuple[str, str]]:
    """(marker or '', code) of every fenced block of `language` in README.md."""
    text = README.read_text()
    pattern = rf"(?:<!-- readme-test: ([^>]*?) -->\n)?```{language}\n(.*?)```"
    return [(m.group(1) or "", m.group(2)) for m in re.finditer(pattern, text, re.S)]


def _commands() -> list[str]:
    """Every shell command of README.md's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for _, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


NOT_RUN = {  # commands the README gives that a test cannot run offline on CPU, and why
    "pytest": "the test command itself",
    "install-lmms-eval-cpu.sh": "installs packages (CI runs it before the suite)",
    "-m lmms_eval": "the lmms-eval CLI: tests/test_lmms_eval.py::test_lmms_eval_cli_end_to_end runs it",
    "--device cuda": "a CUDA GPU and a checkpoint download",
    "-m training.attention_stats": "minutes on a bundle; tests/test_attention_stats.py measures tiny models",
}
FAST = {  # appended so that each README command runs in seconds (later options override earlier ones)
    "bench": ["--policies", "pool", "--keeps", "0.25", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1"],
    "eval": ["--policies", "pool", "--keeps", "0.25", "--limit", "2", "--batch-size", "2"],
}


def _tokenzip_args(command: str) -> list[str] | None:
    """The arguments of the `tokenzip` invocation in a README command line (after `&&`, an env var, .venv/bin/)."""
    part = command.split("&&")[-1].strip()
    words = shlex.split(part)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words and words[0].endswith("tokenzip"):
        return words[1:]
    return None


def test_readme_commands_are_all_accounted_for():
    """Each command line either runs in the tests below or is a kind listed in NOT_RUN (with its reason)."""
    for command in _commands():
        if _tokenzip_args(command) is None and not command.startswith("python -c"):
            assert any(key in command for key in NOT_RUN), command
        elif "--device cuda" in command:
            assert re.search(r"--model \S+/\S+", command), command  # a hub checkpoint: downloads, GPU only
    main = [c for c in _commands() if c.startswith("python3 -m venv")]
    assert len(main) == 1 and _tokenzip_args(main[0]) == ["bench", "--model", "synth-llava", "--accuracy", "120"]


def _runnable() -> list[str]:
    return [
        c
        for c in _commands()
        if (_tokenzip_args(c) is not None or c.startswith("python -c")) and not any(k in c for k in NOT_RUN)
    ]


@pytest.mark.parametrize("command", _runnable())
def test_readme_command_runs(command, tmp_path, monkeypatch):
    """Run as written (bench / eval with the FAST overrides appended and --out in a temporary folder), from a
    folder holding the README's test picture."""
    from tokenzip.synthetic import sample

    monkeypatch.chdir(tmp_path)
    if command.startswith("python -c"):
        exec(shlex.split(command)[2], {})
        assert Image.open("img.png").size[0] > 0
        return
    sample("test", 1, version="v2").image().save(tmp_path / "img.png")  # what the README's python -c line writes
    args = _tokenzip_args(command)
    sub = args[0]
    if sub == "eval":
        pytest.importorskip("lmms_eval", reason="tokenzip eval needs lmms-eval (installed in CI)")
    extra = list(FAST.get(sub, []))
    if "--accuracy" in args:
        extra += ["--accuracy", "6"]
    if "--random-weights" in args:
        extra += ["--text-layers", "1", "--vision-layers", "1", "--image-size", "64x64"]
    if sub in ("bench", "eval"):
        extra += ["--out", str(tmp_path / "out")]
    output = invoke(args + extra).output
    if sub == "bench" and "--accuracy" in args:
        rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
        assert all(r["accuracy"] is not None for r in rows if r["error"] is None)
    if sub == "show":
        written = args[args.index("--out") + 1] if "--out" in args else "kept.png"
        assert "answer (" in output and Image.open(tmp_path / written).width >= 512


@pytest.fixture(scope="module")
def llava_inputs():
    """`model` and `inputs` for the README snippets that assume them: the bundled synth-llava and one question."""
    from tokenzip.loading import load_vlm
    from tokenzip.synthetic import sample

    model, processor = load_vlm("synth-llava")
    s = sample("test", 1, version="v2")  # the data the bundle was trained on
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question.text}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return model, dict(processor(images=s.image(), text=prompt, return_tensors="pt"))


# the 30-second example: tests/test_stats.py::test_readme_30_second_example_runs_as_written runs it, output checked
PYTHON_BLOCKS = [code for marker, code in _blocks("python") if marker != "30-second example"]


def test_readme_python_blocks_are_found():
    assert len(PYTHON_BLOCKS) == len(_blocks("python")) - 1 >= 3
    assert 'tokenzip.apply(model, policy="hiprune", keep=0.222)' in PYTHON_BLOCKS[0]  # the headline


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_blocks_run(index, llava_inputs):
    """Run as written, with `model` and `inputs` (which the headline assumes) from the bundled synth-llava."""
    code = PYTHON_BLOCKS[index]
    model, inputs = llava_inputs
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme", "model": model, "inputs": inputs})
    assert tokenzip.api.current_patch(model) is None  # the snippets leave the model unpatched


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bench_accuracy_asks_the_questions_of_the_models_training_data(version, tmp_path, monkeypatch):
    """`bench --accuracy` scores a trained model on the dataset version its training.json records (a v2 model asked
    v1 questions would measure a distribution shift, not the policies)."""
    import shutil

    from tokenzip import assets
    from tokenzip.synthetic import evaluate as evaluate_module

    model_dir = tmp_path / "model"
    shutil.copytree(assets.path("synth-llava"), model_dir)
    record = json.loads((model_dir / "training.json").read_text())
    record["config"]["data_version"] = version
    (model_dir / "training.json").write_text(json.dumps(record))
    asked: list[str] = []
    real = evaluate_module.evaluate

    def spy(*args, **kwargs):
        asked.append(kwargs.get("version", "v1"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    invoke(["bench", "--model", str(model_dir), "--accuracy", "2", *FAST["bench"], "--out", str(tmp_path / "out")])
    assert asked and set(asked) == {version}
