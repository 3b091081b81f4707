"""`tokenzip eval`: a policy x keep grid scored by lmms-eval in one process, summarised in one table.

The model is loaded once; the unpatched model runs first (its answers are the reference of the agreement
metric), then every policy at every keep. Each run is a real `lmms_eval.evaluator.simple_evaluate` call on the
tokenzip lmms-eval model; visual-token counts and FLOPs come from the patch's per-sample statistics.
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

    @property
    def budget_flag(self) -> str:
        """'' on budget, else 'OFF BUDGET (k of n samples)'."""
        return f"OFF BUDGET ({self.off_budget} of {self.samples} samples)" if self.off_budget else ""


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
    task: str = "tokenzip_synth",
    policies: list[str] | None = None,
    keeps: list[float] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    policy_options: dict[str, dict[str, Any]] | None = None,
    on_row: Callable[[GridRow], None] | None = None,
) -> list[GridRow]:
    """Rows: the unpatched model first, then every policy at every keep (in the given order)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from ..errors import TokenzipError
    from ..loading import model_family
    from .lmms_model import CLASSES

    policies = list(policies) if policies is not None else []
    keeps = list(keeps) if keeps is not None else [0.111, 0.222, 0.333]
    policy_options = policy_options or {}
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
    runs = [("none", 1.0)] + [(p, k) for p in policies if p != "none" for k in keeps]
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
        if on_row is not None:
            on_row(row)
    base = rows[0].accuracy
    for row in rows:
        row.retention = row.accuracy / base if base else math.nan
    return rows


COLUMNS = [
    ("policy", "policy", "{}"),
    ("keep", "keep", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("retention", "retention", "{:.3f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("visual_llm_input", "visual -> LLM", "{:.1f}"),
    ("visual_layer_mean", "visual layer avg", "{:.1f}"),
    ("visual_budget", "budget", "{:g}"),
    ("flops_ratio", "FLOPs ratio", "{:.3f}"),
    ("seconds", "s", "{:.0f}"),
    ("note", "note", "{}"),
]


def cells(row: GridRow) -> list[str]:
    """The formatted `COLUMNS` of a row; an off-budget row's note starts with its OFF BUDGET flag."""
    out = []
    for key, _, fmt in COLUMNS:
        value = getattr(row, key)
        if key == "note":
            value = "; ".join(x for x in (row.budget_flag, value.split(";")[0][:60]) if x)
        out.append("—" if isinstance(value, float) and math.isnan(value) else fmt.format(value))
    return out


def markdown(rows: list[GridRow], title: str) -> str:
    categories = sorted({c for r in rows for c in r.categories})
    head = [label for _, label, _ in COLUMNS] + categories
    legend = (
        "budget: the layer-averaged visual tokens keep allows per sample (sum over its items of item_budget(keep, "
        "n_content)); OFF BUDGET in the note: samples whose layer average is more than one token per item away."
    )
    lines = [f"# {title}", "", legend, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cats = [f"{r.categories[c]:.3f}" if c in r.categories else "—" for c in categories]
        lines.append("| " + " | ".join(cells(r) + cats) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[GridRow], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    (out_dir / "eval.md").write_text(markdown(rows, title))
