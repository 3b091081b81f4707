"""The `tokenzip` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

HELP = """Visual-token compression for HF VLMs.

In every subcommand `-o` / `--option` sets a policy option (repeatable): `key=value` where one policy runs (flops,
show), `policy.key=value` where several do (bench, eval; flops and show accept that form too). Output files and
folders are always `--out`."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"tokenzip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    pass


_main.__doc__ = HELP


class RunProgress:
    """Progress of a sequence of runs: a rich progress bar on a terminal; elsewhere (a pipe, a CI log, a file) one
    plain line when it starts and one per finished run, flushed at once, so a log shows where a long job is."""

    def __init__(self, total: int, title: str, out: Console | None = None) -> None:
        self.total, self.title, self.out = total, title, out or console
        self.done = 0
        self._bar = None
        self._task = None
        self._start = 0.0

    def __enter__(self) -> RunProgress:
        import time

        self._start = time.perf_counter()
        if self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar = Progress(*columns, console=self.out, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total)
        else:
            self._line(f"{self.title}: {self.total} runs")
        return self

    def _line(self, text: str) -> None:
        self.out.print(text, highlight=False, markup=False, soft_wrap=True)
        self.out.file.flush()

    def advance(self, label: str, detail: str = "") -> None:
        """One run finished: `label` names it (e.g. 'hiprune keep=0.111'), `detail` says what it measured."""
        import time

        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.title}: {label}")
            return
        elapsed = time.perf_counter() - self._start
        self._line(f"[{self.done}/{self.total}] {label}{': ' + detail if detail else ''} ({elapsed:.0f} s)")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@app.command("policies")
def policies() -> None:
    """List the registered policies."""
    from .policies import list_policies

    table = Table("policy", "description")
    for name, description in list_policies().items():
        table.add_row(name, description)
    console.print(table)


@app.command("demo")
def demo(
    family: str = typer.Option(
        "llava", help="tiny model family: llava, qwen2_5_vl, llava_onevision, qwen2_vl, llava_next or qwen3_vl"
    ),
    keep: float = typer.Option(0.25, help="fraction of visual tokens to keep (layer-averaged budget)"),
    new_tokens: int = typer.Option(8, help="tokens to generate"),
) -> None:
    """Run every baseline policy on a tiny offline model and show what each one did.

    The tiny model has random weights (no download): the generated tokens are meaningless, the token counts and
    the check that cached generation equals a cache-free recomputation ("cache ok") are not.
    """
    import torch

    from .api import apply
    from .reference import cached_greedy, uncached_logits
    from .tiny import FACTORIES, dummy_image, tiny

    if family not in FACTORIES:
        raise typer.BadParameter(f"unknown family {family!r}; choose one of {sorted(FACTORIES)}")
    vlm = tiny(family)
    inputs = vlm.inputs([dummy_image(112, 112, 0)], vlm.prompt("What is in the image ?"))
    table = Table(
        "policy",
        "keep",
        "visual",
        "into LLM",
        "layer avg",
        "select ms",
        "cache ok",
        "first tokens",
        title=f"tokenzip demo on a tiny random {family} (offline)",
    )
    base, _ = cached_greedy(vlm.model, inputs, new_tokens)
    table.add_row("(unpatched)", "-", "-", "-", "-", "-", "-", " ".join(map(str, base[0, :4].tolist())))
    for name, options in [("none", {}), ("random", {}), ("pool", {}), ("fastv", {})]:
        with apply(vlm.model, name, keep, **options) as patch:
            tokens, logits = cached_greedy(vlm.model, inputs, new_tokens)
            with patch.replay():
                reference = uncached_logits(vlm.model, inputs, tokens)
            record = patch.stats.history[0]
        sample = record.samples[0]
        selection = sum(v for k, v in record.seconds.items() if k != "vision_encoder") * 1e3
        same = bool(torch.allclose(logits, reference, atol=1e-4))
        table.add_row(
            name,
            str(keep),
            str(sample.visual_in),
            str(sum(it.kept for it in sample.items)),
            f"{sample.visual_mean:.1f}",
            f"{selection:.2f}",
            "yes" if same else "NO",
            " ".join(map(str, tokens[0, :4].tolist())),
        )
    console.print(table)


def parse_options(pairs: list[str]) -> dict:
    """`key=value` strings -> policy options (ints, floats, booleans, None and tuples "a,b" understood)."""
    import ast

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"option {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        text = {"true": "True", "false": "False", "none": "None"}.get(raw.lower(), raw)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = raw
        options[key.strip()] = value
    return options


def single_policy_options(pairs: list[str], policy: str) -> dict:
    """Options of the one policy a command runs: `key=value`, or `policy.key=value` naming that policy (the form
    bench and eval take). A value that is not key=value gets an error saying what -o means."""
    options = {}
    for pair in pairs:
        head, sep, _ = pair.partition("=")
        if not sep:
            raise typer.BadParameter(
                f"-o/--option {pair!r} is not key=value: -o sets a policy option in every tokenzip command "
                "(e.g. -o alpha=0.2); the output file is --out"
            )
        prefix, dot, _ = head.partition(".")
        if dot and prefix == policy:
            pair = pair[len(policy) + 1 :]
        elif dot:
            raise typer.BadParameter(f"option {pair!r} names policy {prefix!r}, but this command runs {policy!r}")
        options.update(parse_options([pair]))
    return options


def parse_keep(text: str):
    """'0.111' -> float, '64' -> int tokens per image."""
    return int(text) if text.isdigit() else float(text)


@app.command("flops")
def flops_command(
    model: str = typer.Option("llava-1.5-7b", help="built-in model (see --list)"),
    policy: str = typer.Option("none", help="policy name"),
    keep: str = typer.Option("0.111", help="float fraction or int tokens per image"),
    text_tokens: int = typer.Option(60, help="text tokens in the prompt"),
    images: int = typer.Option(1, help="images in the prompt"),
    image_size: str = typer.Option(
        "", help="HxW of each image (Qwen2.5-VL default 448x448, OneVision 768x768, LLaVA-NeXT 672x672)"
    ),
    frames: int = typer.Option(0, help="price a video of this many frames instead of images"),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="policy option key=value or policy.key=value (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    list_models: bool = typer.Option(False, "--list", help="list the built-in models and exit"),
) -> None:
    """Analytic FLOPs of one prefill and one decode step, unpruned vs. a policy, without weights."""
    import json

    from .budget import validate_keep
    from .configs import builtin_names
    from .errors import TokenzipError
    from .policies import get_policy_class
    from .pricing import meta_model, price, workload

    if list_models:
        console.print("\n".join(builtin_names()))
        return
    if model not in builtin_names():
        raise typer.BadParameter(f"unknown model {model!r}; built-in models: {', '.join(builtin_names())}")
    size = None
    if image_size:
        try:
            h, w = (int(x) for x in image_size.lower().split("x"))
        except ValueError as err:
            raise typer.BadParameter(f"--image-size must look like 448x448, got {image_size!r}") from err
        size = (h, w)
    try:
        keep_value = validate_keep(parse_keep(keep))
        policy_obj = get_policy_class(policy)(**single_policy_options(option, policy))
        meta = meta_model(model)
        work = workload(meta, images=images, image_size=size, frames=frames, text_tokens=text_tokens)
        base = price(meta, work, get_policy_class("none")(), 1.0)
        cost = price(meta, work, policy_obj, keep_value)
    except (TokenzipError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    visual = sum(s.n_content for s in work.shapes)
    result = {
        "model": model,
        "policy": policy,
        "keep": keep_value,
        "visual_tokens": visual,
        "unpruned": base.as_dict(),
        "policy_flops": cost.as_dict(),
        "prefill_ratio": cost.prefill / base.prefill,
        "llm_ratio": cost.llm / base.llm,
    }
    if as_json:
        console.print_json(json.dumps(result))
        return
    what = f"{frames}-frame video" if frames else f"{images} image(s)"
    table = Table(
        "component", "unpruned TFLOPs", f"{policy} TFLOPs", "ratio",
        title=f"{model}: {what}, {visual} visual tokens, {text_tokens} text tokens, keep={keep_value}",
    )  # fmt: skip
    for name in ("vision", "projector", "llm", "lm_head", "prefill", "decode_step"):
        a, b = base.as_dict()[name], cost.as_dict()[name]
        table.add_row(name, f"{a / 1e12:.4f}", f"{b / 1e12:.4f}", f"{b / a:.3f}" if a else "-")
    console.print(table)
    console.print(
        "policy scoring overhead is not included here (it depends on the data): `tokenzip bench` measures it. "
        "FLOPs = 2 x multiply-adds, attention as the full square (see tokenzip.flops)."
    )


DEFAULT_KEEPS = "0.111,0.222,0.333"


def parse_size(text: str, flag: str) -> tuple[int, int] | None:
    """'448x448' -> (448, 448); '' -> None."""
    if not text:
        return None
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError as err:
        raise typer.BadParameter(f"{flag} must look like 448x448, got {text!r}") from err
    return h, w


def parse_policy_options(pairs: list[str]) -> dict[str, dict]:
    """'hiprune.alpha=0.2' strings -> {policy: {option: value}}."""
    out: dict[str, dict] = {}
    for pair in pairs:
        head, _, _ = pair.partition("=")
        if "." not in head:
            raise typer.BadParameter(f"--option {pair!r} must look like policy.key=value (e.g. hiprune.alpha=0.2)")
        policy, _key = head.split(".", 1)
        out.setdefault(policy, {}).update(parse_options([pair[len(policy) + 1 :]]))
    return out


@app.command("bench")
def bench_command(
    model: str = typer.Option(
        "tiny-llava",
        help="tiny-<family> (llava, qwen2_5_vl, llava_onevision, qwen2_vl, llava_next, qwen3_vl; offline), a "
        "built-in config with "
        "--random-weights, or a hub id / local checkpoint directory",
    ),
    random_weights: bool = typer.Option(False, "--random-weights", help="real-shaped model from a built-in config"),
    text_layers: int = typer.Option(0, help="with --random-weights: LLM layers (0 = as the config)"),
    vision_layers: int = typer.Option(0, help="with --random-weights: vision layers (0 = as the config)"),
    policies: str = typer.Option("all", help="comma-separated policy names, or 'all'"),
    keeps: str = typer.Option(DEFAULT_KEEPS, help="comma-separated keeps (fractions or int tokens per image)"),
    option: list[str] = typer.Option([], "--option", "-o", help="policy option policy.key=value (repeatable)"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    attn: str = typer.Option("sdpa", help="sdpa, flash_attention_2 or eager"),
    images: int = typer.Option(1, help="images per prompt"),
    image_size: str = typer.Option("", help="HxW of each image (default: the model's natural size)"),
    image: str = typer.Option("", help="an image file to use instead of a synthetic one (pretrained models)"),
    frames: int = typer.Option(0, help="a video of this many frames instead of images"),
    text_tokens: int = typer.Option(60, help="text tokens of a synthetic prompt (random-weight models)"),
    prompt: str = typer.Option("Describe the image in detail .", help="the question (tiny / pretrained models)"),
    batch: int = typer.Option(1, help="identical prompts per batch"),
    warmup: int = typer.Option(1, help="unmeasured runs per row"),
    repeats: int = typer.Option(
        5, help="measured runs per row (median with its interquartile range, or range below 4; p90 in the files)"
    ),
    decode_tokens: int = typer.Option(16, help="tokens generated for decode speed and agreement (0: skip)"),
    no_flops_count: bool = typer.Option(False, "--no-flops-count", help="skip counting the policies' own FLOPs"),
    out: Path = typer.Option(
        Path("tokenzip-out/bench"), "--out", help="folder for results.json, results.csv, results.md and the plots"
    ),
    seed: int = typer.Option(0, help="seed of random weights and synthetic inputs"),
    accuracy: int = typer.Option(
        0, help="also score the first N synthetic test questions under every row (bundled synth-* models)"
    ),
) -> None:
    """Measure policies side by side: tokens vs budget, FLOPs, TTFT per stage and vs. the oracle, decode speed,
    memory (and, with --accuracy N on a bundled trained model, accuracy on the synthetic test split).

    Times come with their spread; the first row (none, keep 1.0) is the timing control and the header quotes it;
    rows off their layer-averaged budget and a control whose runs disagree beyond their noise are flagged.

    With no arguments it runs offline on a tiny random-weight LLaVA-1.5, every policy but `oracle` (it needs the
    synthetic ground truth) at keep 0.111 / 0.222 / 0.333 plus the unpruned reference, and writes results.json,
    results.csv, results.md, quality_vs_flops.png and ttft_vs_keep.png into ./tokenzip-out/bench.
    """
    import shlex
    import sys

    from .bench import BenchSettings, Workload, load_model, run_bench
    from .bench.report import table, write
    from .errors import TokenzipError
    from .policies import list_policies

    known = list(list_policies())
    deployable = [p for p in known if p not in ("none", "oracle")]  # oracle needs ground truth: `tokenzip eval`
    names = deployable if policies == "all" else [p.strip() for p in policies.split(",")]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise typer.BadParameter(f"unknown policies {unknown}; known: {', '.join(known)}")
    try:
        settings = BenchSettings(
            policies=names,
            keeps=[parse_keep(k.strip()) for k in keeps.split(",") if k.strip()],
            options=parse_policy_options(option),
            warmup=warmup,
            repeats=repeats,
            decode_tokens=decode_tokens,
            count_flops=not no_flops_count,
        )
        work = Workload(
            images=images,
            image_size=parse_size(image_size, "--image-size"),
            frames=frames,
            text_tokens=text_tokens,
            batch=batch,
            prompt=prompt,
            image_path=image or None,
        )
        bm = load_model(
            model,
            device=device,
            dtype=dtype,
            attn=attn,
            random_weights=random_weights,
            text_layers=text_layers or None,
            vision_layers=vision_layers or None,
            seed=seed,
        )
    except (TokenzipError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    evaluator = None
    if accuracy:
        if accuracy < 0 or bm.processor is None:
            raise typer.BadParameter(
                f"--accuracy takes a positive number of questions and a trained model with its processor "
                f"(synth-llava, ... or a directory written by training/train.py); got {accuracy} on {bm.name}"
            )
        from .evaluation.grid import data_version
        from .synthetic.evaluate import evaluate

        version = data_version(model) or "v1"  # score a bundle on the dataset version it was trained on

        def evaluator(patched) -> float:
            return evaluate(patched, bm.processor, bm.family, "test", accuracy, version=version)["all"]

    total = 1 + len([p for p in names if p != "none"]) * len(settings.keeps)
    with RunProgress(total, f"tokenzip bench {bm.name}") as progress:

        def on_row(row) -> None:
            progress.advance(f"{row.policy} keep={row.keep}", bench_row_summary(row))

        try:
            result = run_bench(bm, work, settings, evaluator=evaluator, on_row=on_row)
        except (TokenzipError, ValueError) as err:
            raise typer.BadParameter(str(err)) from err
    wide = console if console.is_terminal else Console(width=200)
    wide.print(table(result))
    command = "tokenzip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write(result, out, command)
    console.print("wrote " + ", ".join(str(p) for p in paths))


def bench_row_summary(row) -> str:
    """One plain-text line of a finished bench row (the progress lines off a terminal)."""
    if row.error is not None:
        return row.error
    parts = [
        f"layer avg {row.layer_mean_tokens:.1f} / budget {row.budget_tokens:g}",
        f"TTFT {row.ttft.median * 1e3:.1f} ms",
        f"overhead {row.overhead:.3f}",
    ]
    if row.accuracy is not None:
        parts.append(f"accuracy {row.accuracy:.3f}")
    return ", ".join(parts + row.flags)


@app.command("show")
def show_command(
    image: Path = typer.Option(..., help="image file"),
    model: str = typer.Option(
        "tiny-llava",
        help="tiny-<family> (llava, qwen2_5_vl, llava_onevision, qwen2_vl, llava_next, qwen3_vl; random, "
        "offline), a bundled name (synth-llava, ...), hub id or directory",
    ),
    question: str = typer.Option("What is in the image ?", help="the question asked about the image"),
    policy: str = typer.Option("hiprune", help="policy name"),
    keep: str = typer.Option("0.111", help="keep (fraction or int tokens per image)"),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="policy option key=value or policy.key=value (repeatable)"
    ),
    dim: float = typer.Option(0.75, help="darkening of dropped cells (0..1)"),
    stages: bool = typer.Option(False, "--stages", help="one row per stage that changed the tokens"),
    new_tokens: int = typer.Option(8, help="tokens of the answer to generate"),
    out: Path = typer.Option(Path("kept.png"), "--out", help="output PNG"),
) -> None:
    """Answer the question under the policy, print the answer and the visual tokens kept, and draw them on the image
    as the model sees it (a labelled figure: title with policy and keep, legend, dropped cells darkened, kept cells
    outlined, merged groups tinted; OneVision: base image, then the high-resolution tiles)."""
    import torch
    from PIL import Image

    from .api import apply
    from .bench.checks import check_sample
    from .errors import TokenzipError
    from .viz import figure, prompt_inputs

    if new_tokens < 1:
        raise typer.BadParameter(f"--new-tokens must be >= 1, got {new_tokens}")
    try:
        if model.startswith("tiny-"):
            from .tiny import FACTORIES, tiny

            if model[len("tiny-") :] not in FACTORIES:
                raise ValueError(
                    f"unknown tiny model {model!r}; choose one of {', '.join('tiny-' + f for f in FACTORIES)}"
                )
            vlm = tiny(model[len("tiny-") :])
            loaded, processor = vlm.model, vlm.processor
        else:
            from .loading import load_vlm

            loaded, processor = load_vlm(model)
        keep_value = parse_keep(keep)
        picture_in = Image.open(image).convert("RGB")
        inputs = prompt_inputs(loaded, processor, picture_in, question)
        with apply(loaded, policy, keep_value, **single_policy_options(option, policy)) as patch, torch.no_grad():
            tokens = loaded.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            record = patch.stats.last  # the prefill (decode steps are not recorded)
    except (FileNotFoundError, TokenzipError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    answer = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    sample = record.samples[0]
    check = check_sample(record.keep, sample)
    console.print(f"question: {question}", highlight=False)
    console.print(f"answer ({policy}, keep={keep_value}): {answer}", highlight=False)
    for j, item in enumerate(sample.items):
        console.print(
            f"{item.modality} {j}: {item.kept} of {item.content} visual tokens enter the LLM", highlight=False
        )
    flag = " (OFF BUDGET)" if check.off else ""
    console.print(
        f"layer-averaged visual tokens {check.layer_mean:.1f}, budget {check.budget:g}{flag}", highlight=False
    )
    picture = figure(loaded, record, picture_in, dim=dim, stages=stages, subtitle=f"Q: {question}  A: {answer}")
    picture.save(out)
    console.print(f"wrote {out} ({picture.size[0]}x{picture.size[1]})", highlight=False)


@app.command("tasks-path")
def tasks_path_command() -> None:
    """Print the folder of tokenzip's lmms-eval tasks (for `python -m lmms_eval --include_path ...`)."""
    from .evaluation import tasks_path

    print(tasks_path())


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        "synth-llava", help="bundled trained model (synth-llava, ...), hub id or checkpoint directory"
    ),
    task: str = typer.Option(
        "",
        help="lmms-eval task (tokenzip's local tasks are included; default: tokenzip_synth, or tokenzip_synth_v2 for "
        "a bundled model trained on v2 data)",
    ),
    policies: str = typer.Option("all", help="comma-separated policy names, or 'all'"),
    keeps: str = typer.Option(DEFAULT_KEEPS, help="comma-separated keeps (fractions or int tokens per image)"),
    option: list[str] = typer.Option([], "--option", "-o", help="policy option policy.key=value (repeatable)"),
    limit: int = typer.Option(0, help="documents per run (0 = the whole task)"),
    batch_size: int = typer.Option(8, help="lmms-eval batch size"),
    device: str = typer.Option("", help="cpu, cuda or cuda:N (default: cuda when available)"),
    attn: str = typer.Option("sdpa", help="sdpa, flash_attention_2 or eager"),
    out: Path = typer.Option(Path("tokenzip-out/eval"), "--out", help="folder for eval.json and eval.md"),
    oracle: bool = typer.Option(True, help="also run the oracle reference selection at every keep"),
) -> None:
    """Score a policy x keep grid with lmms-eval and print one table: accuracy, retention vs. unpruned, gap to the
    oracle reference selection at the same keep (overall and per category), agreement with the unpruned model,
    visual tokens, FLOPs ratio (default: the bundled synth-llava on the synthetic task of its training data,
    offline). Needs lmms-eval (`pip install "tokenzip[eval]"`)."""
    from .errors import TokenzipError
    from .policies import list_policies

    try:
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise typer.BadParameter('tokenzip eval needs lmms-eval: pip install "tokenzip[eval]"') from err
    from .evaluation.grid import COLUMNS, ORACLE, cells, default_task, run_grid, task_mismatch

    try:
        mismatch = task_mismatch(model, task) if task else None
        task = task or default_task(model)
    except TokenzipError as err:
        raise typer.BadParameter(str(err)) from err
    if mismatch:
        console.print(f"[yellow]warning:[/yellow] {mismatch}", highlight=False)
    known = list(list_policies())
    everything = [p for p in known if p not in ("none", ORACLE)]  # the oracle reference runs by --oracle
    names = everything if policies == "all" else [p.strip() for p in policies.split(",")]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise typer.BadParameter(f"unknown policies {unknown}; known: {', '.join(known)}")
    keep_values = [parse_keep(k.strip()) for k in keeps.split(",") if k.strip()]

    runs_oracle = oracle or ORACLE in names
    total = 1 + (len([p for p in names if p not in ("none", ORACLE)]) + runs_oracle) * len(keep_values)
    progress = RunProgress(total, f"tokenzip eval {model} on {task}")

    def on_row(row) -> None:
        detail = ", ".join(f"{label} {cell}" for (_, label, _), cell in zip(COLUMNS[2:], cells(row)[2:]) if cell)
        progress.advance(f"{row.policy} keep={row.keep}", detail)

    try:
        with progress:
            rows = run_grid(
                pretrained=model,
                task=task,
                policies=names,
                keeps=keep_values,
                limit=limit or None,
                batch_size=batch_size,
                attn_implementation=attn,
                device=device or None,
                policy_options=parse_policy_options(option),
                on_row=on_row,
                oracle=oracle,
            )
    except (FileNotFoundError, TokenzipError, ValueError) as err:  # e.g. the bundled model is not installed
        raise typer.BadParameter(str(err)) from err
    _print_eval(rows, model, task, out)


def _print_eval(rows, model: str, task: str, out: Path) -> None:
    import shlex
    import sys

    from rich.table import Table

    from .evaluation.grid import COLUMNS, cells, write

    table = Table(
        title=f"{model} on {task}",
        caption="budget: layer-averaged visual tokens keep allows per sample; OFF BUDGET: samples whose layer average "
        "is more than one token per item away from it. oracle (reference): ground-truth selection, not deployable; "
        "gap to oracle: its accuracy minus the row's at the same keep, in points.",
    )
    for _, label, _ in COLUMNS:
        table.add_column(label, justify="left" if label in ("policy", "note") else "right")
    for row in rows:
        table.add_row(*cells(row), style="red" if row.off_budget else "italic cyan" if row.reference else None)
    wide = console if console.is_terminal else Console(width=200)
    wide.print(table)
    command = "tokenzip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write(rows, out, f"{model} on {task} (`{command}`)")
    console.print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
