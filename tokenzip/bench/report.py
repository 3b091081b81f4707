"""Presenting a `BenchResult`: a rich table, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from .runner import BenchResult, BenchRow

MIB = 2**20


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def interval(summary: dict, scale: float = 1e3, fmt: str = ".1f") -> str:
    """'median (lo–hi)' of a `Summary` dict: the interquartile range from 4 repeats on, the full range below (what
    `Summary.spread` calls the noise); just the median for one run or a result saved without quartiles."""
    median = format(summary["median"] * scale, fmt)
    n = summary.get("n", 1)
    if n < 2 or summary.get("q1") is None:
        return median
    lo, hi = (summary["q1"], summary["q3"]) if n >= 4 else (summary["min"], summary["max"])
    return f"{median} ({format(lo * scale, fmt)}–{format(hi * scale, fmt)})"


def tokens_cell(row: dict) -> str:
    """'visual → LLM input (layer avg / budget)' per sample; 'OFF BUDGET' when a sample misses its budget."""
    budget = row.get("budget_tokens")
    avg = f"{row['layer_mean_tokens']:.1f}" + (f" / {budget:g}" if budget else "")
    mark = " OFF BUDGET" if row.get("off_budget") else ""
    return f"{row['visual_tokens']:g} → {row['llm_input_tokens']:g} ({avg}){mark}"


def overhead_cell(row: dict) -> str:
    """The overhead, with '≈1 (noise)' when the TTFT and oracle medians lie within their noise."""
    text = _num(row["overhead"], ".3f")
    return text + " ≈1 (noise)" if row.get("overhead_resolved") is False else text


def row_cells(row: dict) -> list[str]:
    """Formatted cells of one successful row (a `BenchRow.as_dict()` or its JSON): policy, keep, visual tokens,
    FLOPs ratio, TTFT, vision / selection / LLM, oracle TTFT, overhead, decode tok/s, memory, agreement,
    accuracy (retention), flags."""

    def ms(summary: dict | None) -> str:
        return "-" if summary is None else f"{summary['median'] * 1e3:.1f}"

    accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f} ({_num(row['retention'], '.3f')})"
    return [
        str(row["policy"]),
        str(row["keep"]),
        tokens_cell(row),
        _num(row["flops_ratio"], ".3f"),
        interval(row["ttft"]),
        " / ".join(ms(row[k]) for k in ("vision", "selection", "prefill")),
        interval(row["oracle"]),
        overhead_cell(row),
        _num(row["decode_tps"], ".1f"),
        f"{row['peak_memory'] / MIB:.0f} (+{row['added_memory'] / MIB:.0f})",
        _num(row["agreement"], ".2f"),
        accuracy,
        "; ".join(row.get("flags") or []) or "-",
    ]


def control_line(payload: dict) -> str:
    """The header's timing reference, read from the control row (`none`, keep 1.0) itself, plus the hook-free
    model timed before any patch."""
    rows = payload["rows"]
    first = rows[0] if rows else None
    unpatched = payload["unpatched_ttft"]
    if first is None or first["policy"] != "none" or first.get("error") is not None:
        return f"no control row; the model without hooks: TTFT {interval(unpatched)} ms"
    state = "CONTROL OFF: " + "; ".join(first["flags"]) if first.get("flags") else "control within noise"
    return (
        f"control (none, keep {first['keep']}): TTFT {interval(first['ttft'])} ms, its replay "
        f"{interval(first['oracle'])} ms, the model without hooks {interval(unpatched)} ms; {state}"
    )


LEGEND = (
    "visual → LLM (avg / budget): visual tokens per sample before compression → entering the LLM (layer average / "
    "its budget; OFF BUDGET: more than one token per item away). FLOPs: prefill / unpruned. TTFT ms: median "
    "(interquartile range; the full range below 4 repeats). overhead: policy TTFT / oracle TTFT (same kept tokens, "
    "decisions replayed, no scoring); ≈1 (noise): the two medians lie within their noise. mem: peak (+ over idle). "
    "agree: greedy tokens equal to the unpatched model's. acc: accuracy (retention)."
)


def table(result: BenchResult) -> Table:
    """One line per row: tokens vs budget, FLOPs ratio, TTFT and its split, oracle overhead, decode speed, memory,
    quality, flags. The caption's timing reference is the control row (`none`, keep 1.0) itself.

    Absolute FLOPs, oracle times and p90s of every stage are in the JSON / CSV.
    """
    payload = {"rows": [r.as_dict() for r in result.rows], "unpatched_ttft": asdict(result.unpatched_ttft)}
    t = Table(
        "policy",
        "keep",
        "visual→LLM (avg / budget)",
        "FLOPs",
        "TTFT ms",
        "vis/sel/LLM ms",
        "overhead",
        "dec tok/s",
        "mem MiB",
        "agree",
        "acc",
        "flags",
        title=f"tokenzip bench: {result.description}; {result.workload.describe()}",
        caption=control_line(payload) + ". " + LEGEND,
    )
    for row in result.rows:
        if row.error is not None:
            t.add_row(row.policy, str(row.keep), "[red]refused[/red]", *[""] * 8, f"[red]{row.error}[/red]")
            continue
        cells = row_cells(row.as_dict())
        del cells[6]  # the oracle's TTFT: in the markdown, JSON and CSV
        if row.flags:
            cells = [f"[red]{c}[/red]" if i in (0, len(cells) - 1) else c for i, c in enumerate(cells)]
        t.add_row(*cells)
    return t


CSV_FIELDS = [
    "policy",
    "keep",
    "error",
    "visual_tokens",
    "llm_input_tokens",
    "layer_mean_tokens",
    "budget_tokens",
    "off_budget",
    "prefill_flops",
    "llm_flops",
    "overhead_flops",
    "flops_ratio",
    "llm_flops_ratio",
    "ttft_median_ms",
    "ttft_p90_ms",
    "ttft_q1_ms",
    "ttft_q3_ms",
    "ttft_min_ms",
    "ttft_max_ms",
    "vision_ms",
    "selection_ms",
    "prefill_ms",
    "oracle_median_ms",
    "oracle_p90_ms",
    "overhead",
    "overhead_resolved",
    "decode_tps",
    "peak_memory_mib",
    "added_memory_mib",
    "agreement",
    "accuracy",
    "retention",
    "flags",
]


def _csv_row(row: BenchRow) -> dict:
    out = {"policy": row.policy, "keep": row.keep, "error": row.error or ""}
    if row.error is not None:
        return out
    ms = 1e3
    out.update(
        visual_tokens=row.visual_tokens,
        llm_input_tokens=row.llm_input_tokens,
        layer_mean_tokens=round(row.layer_mean_tokens, 3),
        budget_tokens=row.budget_tokens,
        off_budget=row.off_budget,
        prefill_flops=row.flops["prefill"],
        llm_flops=row.flops["llm"],
        overhead_flops=row.flops["overhead"],
        flops_ratio=round(row.flops_ratio, 5),
        llm_flops_ratio=round(row.llm_flops_ratio, 5),
        ttft_median_ms=round(row.ttft.median * ms, 3),
        ttft_p90_ms=round(row.ttft.p90 * ms, 3),
        ttft_q1_ms=round(row.ttft.q1 * ms, 3),
        ttft_q3_ms=round(row.ttft.q3 * ms, 3),
        ttft_min_ms=round(row.ttft.min * ms, 3),
        ttft_max_ms=round(row.ttft.max * ms, 3),
        vision_ms=round(row.vision.median * ms, 3),
        selection_ms=round(row.selection.median * ms, 3),
        prefill_ms=round(row.prefill.median * ms, 3),
        oracle_median_ms=round(row.oracle.median * ms, 3),
        oracle_p90_ms=round(row.oracle.p90 * ms, 3),
        overhead=round(row.overhead, 4),
        overhead_resolved="" if row.overhead_resolved is None else row.overhead_resolved,
        decode_tps=round(row.decode_tps, 2) if not math.isnan(row.decode_tps) else "",
        peak_memory_mib=round(row.peak_memory / MIB, 1),
        added_memory_mib=round(row.added_memory / MIB, 1),
        agreement=round(row.agreement, 4),
        accuracy="" if row.accuracy is None else row.accuracy,
        retention="" if row.retention is None else row.retention,
        flags="; ".join(row.flags),
    )
    return out


def _no_nan(obj):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    return obj


def markdown(payload: dict) -> str:
    """A saved result (the content of results.json) as GitHub markdown: command, workload, the control line,
    machine, one table row per policy and keep with the columns of `table()` plus the oracle's TTFT."""

    workload = payload.get("workload_text") or ", ".join(f"{k} {v}" for k, v in payload["workload"].items())
    lines = [
        f"# tokenzip bench: {payload['description']}",
        "",
        f"Command: `{payload.get('command', '?')}`",
        "",
        f"Workload: {workload}. Timing {control_line(payload)}.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in payload["machine"].items()) + ".",
        "",
        LEGEND,
        "",
        "| policy | keep | visual → LLM (layer avg / budget) | FLOPs ratio | TTFT ms median (IQR) "
        "| vision / selection / LLM ms | oracle ms median (IQR) | overhead | decode tok/s | peak MiB (+ over idle) "
        "| agreement | accuracy (retention) | flags |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        if row.get("error") is not None:
            lines.append(f"| {row['policy']} | {row['keep']} | error: {row['error']} |" + " |" * 10)
            continue
        lines.append("| " + " | ".join(row_cells(row)) + " |")
    return "\n".join(lines) + "\n"


def write(result: BenchResult, folder: Path, command: str) -> list[Path]:
    """Write results.json, results.csv, results.md and the plots into `folder`; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = _no_nan({"command": command, **result.as_dict()})
    json_path = folder / "results.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    csv_path = folder / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(_csv_row(row))
    md_path = folder / "results.md"
    md_path.write_text(markdown(payload))
    return [json_path, csv_path, md_path, *plot(result, folder)]


OFF_BUDGET_LABEL = "off budget (layer avg > 1 token/item from keep)"


def _mark_off_budget(ax, points: list[tuple[float, float]]) -> None:
    """Red rings around the points of off-budget rows, with one legend entry."""
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=220, facecolors="none", edgecolors="red", linewidths=2, zorder=5, label=OFF_BUDGET_LABEL)


def plot(result: BenchResult, folder: Path) -> list[Path]:
    """quality_vs_flops.png (accuracy, or agreement without a dataset, vs. FLOPs ratio) and ttft_vs_keep.png (median
    TTFT with its noise as error bars). Off-budget rows are ringed in red on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.rows if r.error is None]
    by_policy: dict[str, list[BenchRow]] = {}
    for row in ok[1:]:
        by_policy.setdefault(row.policy, []).append(row)
    has_accuracy = any(r.accuracy is not None for r in ok)
    paths = []

    def quality(row: BenchRow) -> float:
        return row.accuracy if has_accuracy else row.agreement

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r.flops_ratio)
        ax.plot([r.flops_ratio for r in rows], [quality(r) for r in rows], marker="o", label=policy)
    base = ok[0] if ok else None
    if base is not None:
        ax.scatter([1.0], [quality(base)], color="black", label="unpruned")
    _mark_off_budget(ax, [(r.flops_ratio, quality(r)) for r in ok if r.off_budget])
    ax.set_xlabel("prefill FLOPs / unpruned")
    ax.set_ylabel("accuracy" if has_accuracy else "greedy-token agreement with the unpatched model")
    ax.set_title(f"{result.model}: {'accuracy' if has_accuracy else 'agreement'} vs. FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(folder / "quality_vs_flops.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    def noise_bars(rows: list[BenchRow]) -> list[list[float]]:
        """[below, above] the median: the interquartile range from 4 repeats on, the range below."""
        out = [[], []]
        for r in rows:
            t = r.ttft
            lo, hi = (t.q1, t.q3) if t.n >= 4 else (t.min, t.max)
            out[0].append(max(0.0, t.median - lo) * 1e3)
            out[1].append(max(0.0, hi - t.median) * 1e3)
        return out

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in by_policy.items():
        rows = [r for r in rows if isinstance(r.keep, float)]
        rows.sort(key=lambda r: r.keep)
        if rows:
            ax.errorbar(
                [r.keep for r in rows],
                [r.ttft.median * 1e3 for r in rows],
                yerr=noise_bars(rows),
                marker="o",
                capsize=3,
                label=policy,
            )
    oracle = sorted({(r.keep, r.oracle.median) for r in ok[1:] if isinstance(r.keep, float)}, key=lambda kv: kv[0])
    if oracle:
        best: dict[float, float] = {}
        for keep, seconds in oracle:
            best[keep] = min(best.get(keep, seconds), seconds)
        ax.plot(list(best), [v * 1e3 for v in best.values()], "k--", label="oracle (fastest)")
    if base is not None:
        ax.axhline(base.ttft.median * 1e3, color="gray", linestyle=":", label=f"{base.policy} (keep {base.keep})")
    _mark_off_budget(ax, [(r.keep, r.ttft.median * 1e3) for r in ok[1:] if r.off_budget and isinstance(r.keep, float)])
    ax.set_xlabel("keep")
    ax.set_ylabel("TTFT median (ms), bars: IQR / range")
    ax.set_title(f"{result.model}: time to first token vs. keep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(folder / "ttft_vs_keep.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
