"""`tokenzip eval`: a policy x keep grid scored by lmms-eval in one process, summarised in one table.

The model is loaded once; the unpatched model runs first (its answers are the reference of the agreement
metric), then the `oracle` reference selection at every keep, then every policy at every keep. Each run is a real
`lmms_eval.evaluator.simple_evaluate` call on the tokenzip lmms-eval model; visual-token counts and FLOPs come from
the patch's per-sample statistics.

`oracle` keeps the tokens that show what the question needs, from the synthetic generator's ground truth: an upper
reference for a selector at that keep, not a deployable policy. Every row shows its retention (accuracy / unpruned
accuracy) and its gap to the oracle row at the same keep, overall and per category (`compare`).

A bundled synthetic model records the dataset version it was trained on (training.json's config "data_version",
absent = "v1"); `default_task` picks the matching task (`tokenzip_synth` / `tokenzip_synth_v2`, and their video
variants).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import tasks_path

CATEGORY_PREFIX = "acc_"
ORACLE = "oracle"  # the reference selection every grid runs at each keep (tokenzip.policies.oracle)
REFERENCE_NOTE = "reference: ground-truth selection, not deployable"
# dataset version -> the synthetic lmms-eval task of each kind
SYNTH_TASKS = {
    "v1": {"image": "tokenzip_synth", "video": "tokenzip_synth_video"},
    "v2": {"image": "tokenzip_synth_v2", "video": "tokenzip_synth_v2_video"},
}


def data_version(pretrained: str | Path) -> str | None:
    """The synthetic dataset version a bundled model was trained on: training.json's config "data_version"
    ("v1" when absent), for a bundled name (synth-llava, ...) or a directory holding training.json; None for any
    other model (a hub id, a checkpoint without training.json)."""
    from .. import assets

    where = assets.ROOT / str(pretrained) if str(pretrained) in assets.FAMILY_OF else Path(pretrained)
    record = where / "training.json"
    if not record.is_file():
        return None
    try:
        config = json.loads(record.read_text()).get("config") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        from ..errors import TokenzipError

        raise TokenzipError(f"{record} is not a training record (a JSON object with a 'config' object)") from err
    return str(config.get("data_version", "v1"))


def task_version(task: str) -> str | None:
    """The dataset version of one of tokenzip's synthetic tasks; None for any other task."""
    return next((v for v, kinds in SYNTH_TASKS.items() if task in kinds.values()), None)


def default_task(pretrained: str | Path, video: bool = False) -> str:
    """The synthetic task matching the model's training data (v1 for anything that records no version)."""
    version = data_version(pretrained) or "v1"
    if version not in SYNTH_TASKS:
        from ..errors import TokenzipError

        raise TokenzipError(
            f"{pretrained} was trained on synthetic data version {version!r}; tasks exist for {list(SYNTH_TASKS)}"
        )
    return SYNTH_TASKS[version]["video" if video else "image"]


def task_mismatch(pretrained: str | Path, task: str) -> str | None:
    """A warning when a synthetic task of one data version is asked of a bundle trained on another, else None."""
    trained, asked = data_version(pretrained), task_version(task)
    if trained is None or asked is None or trained == asked:
        return None
    kind = next(k for k, t in SYNTH_TASKS[asked].items() if t == task)
    better = SYNTH_TASKS.get(trained, {}).get(kind)
    hint = f"; its own task is {better}" if better else ""
    return (
        f"{pretrained} was trained on synthetic data {trained} but {task} asks {asked} questions: its accuracy "
        f"measures a distribution shift, not the policies{hint}"
    )


@dataclass
class GridRow:
    policy: str
    keep: float
    accuracy: float
    retention: float  # accuracy / unpruned accuracy
    agreement: float  # share of answers equal to the unpruned model's
    visual_in: float  # mean visual tokens per sample before compression
    visual_llm_input: float  # mean visual tokens entering the LLM
    visual_layer_mean: float  # mean layer-averaged visual tokens (what keep budgets)
    flops_ratio: float  # sum of per-sample prefill FLOPs / sum unpruned
    seconds: float
    samples: int
    categories: dict[str, float] = field(default_factory=dict)
    note: str = ""  # why a run has no numbers (e.g. a keep the policy cannot reach on this model)
    visual_budget: float = math.nan  # mean per-sample layer-average budget (sum of item_budget over its items)
    off_budget: int = 0  # samples whose layer average is more than one token per item from their budget
    reference: bool = False  # the oracle row: ground-truth selection, a reference, not a deployable policy
    oracle_gap: float = math.nan  # points: oracle accuracy at this keep - this row's accuracy
    oracle_gap_categories: dict[str, float] = field(default_factory=dict)  # the same per category, in points

    @property
    def budget_flag(self) -> str:
        """'' on budget, else 'OFF BUDGET (k of n samples)'."""
        return f"OFF BUDGET ({self.off_budget} of {self.samples} samples)" if self.off_budget else ""


def compare(rows: list[GridRow]) -> list[GridRow]:
    """Fill in, in place, each row's retention (accuracy / the unpruned `none` row's) and its gap to the `oracle`
    row at the same keep: `oracle_gap` = 100 * (oracle accuracy - row accuracy), and the same per category present
    in both. A row without a `none` / same-keep oracle row (or whose numbers are NaN) gets NaN; the oracle rows
    themselves and `none` get no gap; an oracle row is marked `reference` (note: `REFERENCE_NOTE`). Returns
    `rows`."""
    base = next((r.accuracy for r in rows if r.policy == "none"), math.nan)
    oracles = {r.keep: r for r in rows if r.policy == ORACLE}
    for row in rows:
        row.reference = row.policy == ORACLE
        if row.reference and not row.note:  # a failed oracle run keeps its error as the note
            row.note = REFERENCE_NOTE
        row.retention = row.accuracy / base if base else math.nan
        ref = oracles.get(row.keep)
        if ref is None or row.reference or row.policy == "none":
            row.oracle_gap, row.oracle_gap_categories = math.nan, {}
            continue
        row.oracle_gap = 100 * (ref.accuracy - row.accuracy)
        row.oracle_gap_categories = {
            c: 100 * (ref.categories[c] - v) for c, v in sorted(row.categories.items()) if c in ref.categories
        }
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarise(policy: str, keep: float, task_results: dict, stats: list[dict], seconds: float) -> GridRow:
    """One table row from lmms-eval's results of one task and the model's per-sample statistics."""
    metrics = {k.split(",")[0]: v for k, v in task_results.items() if "," in k and "_stderr" not in k}
    from ..bench.checks import BudgetCheck

    checks = [
        BudgetCheck(r["visual_budget"], r["visual_layer_mean"], r.get("visual_items", 1))
        for r in stats
        if r.get("visual_budget") is not None and r.get("visual_layer_mean") is not None
    ]
    prefill = sum(r["prefill_flops"] for r in stats if "prefill_flops" in r)
    unpruned = sum(r["prefill_flops_unpruned"] for r in stats if "prefill_flops_unpruned" in r)
    return GridRow(
        policy=policy,
        keep=keep,
        accuracy=float(metrics.get("exact_match", math.nan)),
        retention=math.nan,
        agreement=float(metrics.get("agreement", math.nan)),
        visual_in=_mean([r["visual_in"] for r in stats if "visual_in" in r]),
        visual_llm_input=_mean([r["visual_llm_input"] for r in stats if "visual_llm_input" in r]),
        visual_layer_mean=_mean([r["visual_layer_mean"] for r in stats if "visual_layer_mean" in r]),
        flops_ratio=prefill / unpruned if unpruned else math.nan,
        seconds=seconds,
        samples=len(stats),
        categories={
            k[len(CATEGORY_PREFIX) :]: float(v) for k, v in sorted(metrics.items()) if k.startswith(CATEGORY_PREFIX)
        },
        visual_budget=_mean([c.budget for c in checks]),
        off_budget=sum(c.off for c in checks),
    )


def run_grid(
    pretrained: str = "synth-llava",
    task: str | None = None,
    policies: list[str] | None = None,
    keeps: list[float] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    policy_options: dict[str, dict[str, Any]] | None = None,
    on_row: Callable[[GridRow], None] | None = None,
    oracle: bool = True,
) -> list[GridRow]:
    """Rows: the unpatched model first, then (with `oracle`) the oracle reference at every keep, then every policy
    at every keep (in the given order; "none" and "oracle" in `policies` are not repeated; "oracle" there runs it
    even when `oracle` is False). Each row reaches `on_row` with its retention and oracle gap already filled in
    (`compare`). `task` defaults to the synthetic task of the model's training data (`default_task`)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from ..errors import TokenzipError
    from ..loading import model_family
    from .lmms_model import CLASSES

    policies = list(policies) if policies is not None else []
    keeps = list(keeps) if keeps is not None else [0.111, 0.222, 0.333]
    policy_options = policy_options or {}
    task = task or default_task(pretrained)
    family = model_family(pretrained)
    model = CLASSES[family](
        pretrained=pretrained,
        policy="none",
        keep=1.0,
        attn_implementation=attn_implementation,
        device=device,
        batch_size=batch_size,
        agreement=True,  # the unpatched run records the reference answers
    )
    model.persistent = True
    manager = TaskManager("WARNING", include_path=tasks_path())
    references = [(ORACLE, k) for k in keeps] if oracle or ORACLE in policies else []
    runs = [("none", 1.0)] + references + [(p, k) for p in policies if p not in ("none", ORACLE) for k in keeps]
    rows: list[GridRow] = []
    for policy, keep in runs:
        start = time.perf_counter()
        try:
            model.configure(policy, keep, policy_options.get(policy, {}), agreement=False)
            out = simple_evaluate(
                model=model,
                tasks=[task],
                task_manager=manager,
                batch_size=batch_size,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="WARNING",
            )
            row = summarise(policy, keep, out["results"][task], model.sample_stats, time.perf_counter() - start)
        except TokenzipError as err:  # e.g. FastV cannot reach keep 0.111 as a layer average on a shallow LLM
            row = GridRow(policy, keep, *[math.nan] * 8, samples=0, note=str(err))
        rows.append(row)
        compare(rows)
        if on_row is not None:
            on_row(row)
    return compare(rows)


COLUMNS = [
    ("policy", "policy", "{}"),
    ("keep", "keep", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("retention", "retention", "{:.3f}"),
    ("oracle_gap", "gap to oracle (pts)", "{:+.1f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("visual_llm_input", "visual -> LLM", "{:.1f}"),
    ("visual_layer_mean", "visual layer avg", "{:.1f}"),
    ("visual_budget", "budget", "{:g}"),
    ("flops_ratio", "FLOPs ratio", "{:.3f}"),
    ("seconds", "s", "{:.0f}"),
    ("note", "note", "{}"),
]


def cells(row: GridRow) -> list[str]:
    """The formatted `COLUMNS` of a row; an off-budget row's note starts with its OFF BUDGET flag; an oracle row's
    policy reads "oracle (reference)"."""
    out = []
    for key, _, fmt in COLUMNS:
        value = getattr(row, key)
        if key == "policy" and row.reference:
            value = f"{value} (reference)"
        if key == "note":
            value = "; ".join(x for x in (row.budget_flag, value.split(";")[0][:60]) if x)
        out.append("—" if isinstance(value, float) and math.isnan(value) else fmt.format(value))
    return out


def _gap(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:+.1f}"


def markdown(rows: list[GridRow], title: str) -> str:
    """The grid as markdown: the main table (one row per run, category accuracies last), then the gap of every
    pruned row to the oracle row at its keep, overall and per category. Gaps and retention are taken from the rows
    (`run_grid` fills them in; call `compare` on rows built otherwise)."""
    categories = sorted({c for r in rows for c in r.categories})
    head = [label for _, label, _ in COLUMNS] + categories
    legend = (
        "budget: the layer-averaged visual tokens keep allows per sample (sum over its items of item_budget(keep, "
        "n_content)); OFF BUDGET in the note: samples whose layer average is more than one token per item away."
    )
    if any(r.reference for r in rows):
        legend += (
            " oracle (reference): keeps the tokens that show what the question needs, from the generator's ground "
            "truth (tokenzip.policies.oracle) — a reference for what a selector can reach at that keep, not a "
            "deployable policy. gap to oracle (pts): oracle accuracy minus the row's at the same keep, in percentage "
            "points (positive: the oracle is better); retention: accuracy / unpruned accuracy."
        )
    lines = [f"# {title}", "", legend, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cats = [f"{r.categories[c]:.3f}" if c in r.categories else "—" for c in categories]
        lines.append("| " + " | ".join(cells(r) + cats) + " |")
    compared = [r for r in rows if not r.reference and r.policy != "none"]
    if any(r.reference for r in rows) and compared:
        gap_head = ["policy", "keep", "retention", "overall", *categories]
        lines += [
            "",
            "## Gap to oracle, in points (oracle accuracy − row accuracy at the same keep)",
            "",
            "| " + " | ".join(gap_head) + " |",
            "|" + "---|" * len(gap_head),
        ]
        for r in compared:
            retention = "—" if math.isnan(r.retention) else f"{r.retention:.3f}"
            cats = [_gap(r.oracle_gap_categories.get(c)) for c in categories]
            lines.append("| " + " | ".join([r.policy, f"{r.keep:.3f}", retention, _gap(r.oracle_gap), *cats]) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[GridRow], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    (out_dir / "eval.md").write_text(markdown(rows, title))
