"""Presenting a `BenchResult`: a rich table, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from rich.table import Table

from .runner import BenchResult, BenchRow

MIB = 2**20


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def row_cells(row: dict) -> list[str]:
    """Formatted cells of one successful row (a `BenchRow.as_dict()` or its JSON): policy, keep, visual tokens,
    FLOPs ratio, TTFT, vision / selection / LLM, oracle TTFT, overhead, decode tok/s, memory, agreement,
    accuracy (retention)."""

    def ms(summary: dict | None) -> str:
        return "-" if summary is None else f"{summary['median'] * 1e3:.1f}"

    ttft = row["ttft"]
    accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f} ({_num(row['retention'], '.3f')})"
    return [
        str(row["policy"]),
        str(row["keep"]),
        f"{row['visual_tokens']:g} → {row['llm_input_tokens']:g} ({row['layer_mean_tokens']:.1f})",
        _num(row["flops_ratio"], ".3f"),
        f"{ttft['median'] * 1e3:.1f} ({ttft['p90'] * 1e3:.1f})",
        " / ".join(ms(row[k]) for k in ("vision", "selection", "prefill")),
        ms(row["oracle"]),
        _num(row["overhead"], ".3f"),
        _num(row["decode_tps"], ".1f"),
        f"{row['peak_memory'] / MIB:.0f} (+{row['added_memory'] / MIB:.0f})",
        _num(row["agreement"], ".2f"),
        accuracy,
    ]


def table(result: BenchResult) -> Table:
    """One line per row: tokens, FLOPs ratio, TTFT and its split, oracle overhead, decode speed, memory, quality.

    Absolute FLOPs, oracle times and p90s of every stage are in the JSON / CSV.
    """
    t = Table(
        "policy",
        "keep",
        "visual→LLM (avg)",
        "FLOPs",
        "TTFT ms",
        "vis/sel/LLM ms",
        "overhead",
        "dec tok/s",
        "mem MiB",
        "agree",
        "acc",
        title=f"tokenzip bench: {result.description}; {result.workload.describe()}",
        caption=(
            f"unpatched TTFT {result.unpatched_ttft.median * 1e3:.1f} ms. FLOPs: prefill / unpruned. TTFT: median "
            "(p90). overhead: policy TTFT / oracle TTFT (same kept tokens, decisions replayed, no scoring). mem: "
            "peak (+ over idle). agree: greedy tokens equal to the unpatched model's. acc: accuracy (retention)."
        ),
    )
    for row in result.rows:
        if row.error is not None:
            t.add_row(row.policy, str(row.keep), f"[red]{row.error}[/red]")
            continue
        cells = row_cells(row.as_dict())
        del cells[6]  # the oracle's TTFT: in the markdown, JSON and CSV
        t.add_row(*cells)
    return t


CSV_FIELDS = [
    "policy",
    "keep",
    "error",
    "visual_tokens",
    "llm_input_tokens",
    "layer_mean_tokens",
    "prefill_flops",
    "llm_flops",
    "overhead_flops",
    "flops_ratio",
    "llm_flops_ratio",
    "ttft_median_ms",
    "ttft_p90_ms",
    "vision_ms",
    "selection_ms",
    "prefill_ms",
    "oracle_median_ms",
    "oracle_p90_ms",
    "overhead",
    "decode_tps",
    "peak_memory_mib",
    "added_memory_mib",
    "agreement",
    "accuracy",
    "retention",
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
        prefill_flops=row.flops["prefill"],
        llm_flops=row.flops["llm"],
        overhead_flops=row.flops["overhead"],
        flops_ratio=round(row.flops_ratio, 5),
        llm_flops_ratio=round(row.llm_flops_ratio, 5),
        ttft_median_ms=round(row.ttft.median * ms, 3),
        ttft_p90_ms=round(row.ttft.p90 * ms, 3),
        vision_ms=round(row.vision.median * ms, 3),
        selection_ms=round(row.selection.median * ms, 3),
        prefill_ms=round(row.prefill.median * ms, 3),
        oracle_median_ms=round(row.oracle.median * ms, 3),
        oracle_p90_ms=round(row.oracle.p90 * ms, 3),
        overhead=round(row.overhead, 4),
        decode_tps=round(row.decode_tps, 2) if not math.isnan(row.decode_tps) else "",
        peak_memory_mib=round(row.peak_memory / MIB, 1),
        added_memory_mib=round(row.added_memory / MIB, 1),
        agreement=round(row.agreement, 4),
        accuracy="" if row.accuracy is None else row.accuracy,
        retention="" if row.retention is None else row.retention,
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
    """A saved result (the content of results.json) as GitHub markdown: command, workload, machine, one table row
    per policy and keep with the columns of `table()` plus the oracle's TTFT."""

    base = payload["unpatched_ttft"]
    workload = payload.get("workload_text") or ", ".join(f"{k} {v}" for k, v in payload["workload"].items())
    lines = [
        f"# tokenzip bench: {payload['description']}",
        "",
        f"Command: `{payload.get('command', '?')}`",
        "",
        f"Workload: {workload}. Unpatched TTFT {base['median'] * 1e3:.1f} ms (p90 {base['p90'] * 1e3:.1f} ms).",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in payload["machine"].items()) + ".",
        "",
        "| policy | keep | visual → LLM (layer avg) | FLOPs ratio | TTFT ms median (p90) | vision / selection / LLM ms "
        "| oracle ms | overhead | decode tok/s | peak MiB (+ over idle) | agreement | accuracy (retention) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        if row.get("error") is not None:
            lines.append(f"| {row['policy']} | {row['keep']} | error: {row['error']} |" + " |" * 9)
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


def plot(result: BenchResult, folder: Path) -> list[Path]:
    """quality_vs_flops.png (accuracy, or agreement without a dataset, vs. FLOPs ratio) and ttft_vs_keep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.rows if r.error is None]
    by_policy: dict[str, list[BenchRow]] = {}
    for row in ok[1:]:
        by_policy.setdefault(row.policy, []).append(row)
    has_accuracy = any(r.accuracy is not None for r in ok)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r.flops_ratio)
        quality = [r.accuracy if has_accuracy else r.agreement for r in rows]
        ax.plot([r.flops_ratio for r in rows], quality, marker="o", label=policy)
    base = ok[0] if ok else None
    if base is not None:
        ax.scatter([1.0], [base.accuracy if has_accuracy else base.agreement], color="black", label="unpruned")
    ax.set_xlabel("prefill FLOPs / unpruned")
    ax.set_ylabel("accuracy" if has_accuracy else "greedy-token agreement with the unpatched model")
    ax.set_title(f"{result.model}: quality vs. FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(folder / "quality_vs_flops.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in by_policy.items():
        rows = [r for r in rows if isinstance(r.keep, float)]
        rows.sort(key=lambda r: r.keep)
        if rows:
            ax.plot([r.keep for r in rows], [r.ttft.median * 1e3 for r in rows], marker="o", label=policy)
    oracle = sorted({(r.keep, r.oracle.median) for r in ok[1:] if isinstance(r.keep, float)}, key=lambda kv: kv[0])
    if oracle:
        best: dict[float, float] = {}
        for keep, seconds in oracle:
            best[keep] = min(best.get(keep, seconds), seconds)
        ax.plot(list(best), [v * 1e3 for v in best.values()], "k--", label="oracle (fastest)")
    if base is not None:
        ax.axhline(base.ttft.median * 1e3, color="gray", linestyle=":", label="unpruned")
    ax.set_xlabel("keep")
    ax.set_ylabel("TTFT median (ms)")
    ax.set_title(f"{result.model}: time to first token vs. keep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(folder / "ttft_vs_keep.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
