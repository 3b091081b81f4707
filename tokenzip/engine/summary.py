"""What one prefill saved, per sample, under key names that are the same for every policy.

`ForwardRecord.summary()` (and the record's repr) answers "what did I save": per sample the visual tokens in
(before compression), entering the LLM, the layer average against the budget `keep` asks for, the prefill FLOPs
as run and unpruned, and the policy's selection time. The FLOPs come from `tokenzip.flops.sample_flops` (the
tokens every component really processed), with the lm_head on one position per sample as in `generate`, for the
run and the unpruned model alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODEL_STAGE = "vision_encoder"  # the only entry of `ForwardRecord.seconds` that is model work, not policy work
SELECTION_STAGES = ("vision", "pre_llm", "llm", "decode", "other")
_STAGE_OF = {"vision_stage": "vision", "pre_llm": "pre_llm", "decode": "decode"}


def selection_stages(seconds: dict[str, float]) -> dict[str, float]:
    """The policy's work of one prefill in fixed stages (every key of `SELECTION_STAGES`, 0.0 where unused).

    seconds: a record's raw per-stage seconds (`vision_encoder`, `vision_stage`, `pre_llm`, `llm_signals`,
    `llm@k`, `decode`). `vision`: signals and stages inside the feature call; `pre_llm`: the selection before
    the LLM; `llm`: signal recomputation and every in-LLM stage; `decode`: KV-cache edits after prefill;
    `other`: any further entry. The vision encoder's own time is model work and not included.
    """
    out = dict.fromkeys(SELECTION_STAGES, 0.0)
    for key, value in seconds.items():
        if key == MODEL_STAGE:
            continue
        stage = _STAGE_OF.get(key) or ("llm" if key.startswith("llm") else "other")
        out[stage] += float(value)
    return out


@dataclass(frozen=True)
class SampleSummary:
    """One sample of one prefill. Field names are the same for every policy (`as_dict()` for logs).

    visual_in: visual content tokens of the sample's images / videos before compression.
    visual_llm_input: visual tokens entering the LLM (kept + zero rows a policy padded in).
    visual_layer_mean: visual tokens averaged over the decoder layers (the quantity `keep` budgets).
    budget: the layer-average budget, sum over items of `tokenzip.budget.item_budget(keep, content tokens)` (all
        tokens for policy `none`); budget_gap = visual_layer_mean - budget; on_budget: |gap| <= one token per item.
    prefill_flops / prefill_flops_unpruned / flops_ratio: analytic prefill FLOPs as run and of the unpatched
        model on the same prompt (vision tower and projector shared equally by the batch; None when the record
        carries no model config).
    vision_encoder_s, selection_s, selection_stages_s: seconds of the whole batch's prefill (shared by its
        samples): the vision tower's own work, all policy work, and that work per stage (`selection_stages`).
    """

    sample: int
    items: int
    visual_in: int
    visual_llm_input: int
    visual_layer_mean: float
    budget: int
    budget_gap: float
    on_budget: bool
    prefill_flops: float | None
    prefill_flops_unpruned: float | None
    flops_ratio: float | None
    vision_encoder_s: float
    selection_s: float
    selection_stages_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(record) -> list[SampleSummary]:
    """Per-sample summaries of a `ForwardRecord` (see `SampleSummary`)."""
    from ..flops import sample_flops

    flops = None
    if record.config is not None and all(s.prompt_tokens is not None for s in record.samples):
        flops = sample_flops(record.config, record, [s.prompt_tokens for s in record.samples])
    stages = selection_stages(record.seconds)
    selection = sum(stages.values())
    out = []
    for b, s in enumerate(record.samples):
        budget = s.budget if s.budget is not None else s.visual_in
        f = flops[b] if flops is not None else {}
        out.append(
            SampleSummary(
                sample=b,
                items=len(s.items),
                visual_in=s.visual_in,
                visual_llm_input=s.visual_llm_input,
                visual_layer_mean=s.visual_mean,
                budget=budget,
                budget_gap=s.visual_mean - budget,
                on_budget=abs(s.visual_mean - budget) <= len(s.items),
                prefill_flops=f.get("prefill"),
                prefill_flops_unpruned=f.get("prefill_unpruned"),
                flops_ratio=f.get("ratio"),
                vision_encoder_s=float(record.seconds.get(MODEL_STAGE, 0.0)),
                selection_s=selection,
                selection_stages_s=dict(stages),
            )
        )
    return out


def format_flops(value: float | None) -> str:
    """FLOPs with three significant digits and an SI prefix: 1.234e9 -> '1.23 G', 2.5e7 -> '25.0 M'; None -> '-'."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:#.3g}".rstrip(".") + f" {prefix}"
    return f"{value:#.3g}".rstrip(".")


_COLUMNS = ("sample", "items", "visual in", "LLM input", "layer mean", "budget", "on budget", "FLOPs as run",
            "FLOPs unpruned", "ratio")  # fmt: skip


def format_record(record) -> str:
    """A multi-line, aligned text view of a `ForwardRecord` (its repr)."""
    rows = summarize(record)
    stages = selection_stages(record.seconds)
    used = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items() if v > 0)
    selection = sum(stages.values()) * 1e3
    head = (
        f"ForwardRecord(policy={record.policy!r}, keep={record.keep!r}): {len(rows)} sample"
        f"{'' if len(rows) == 1 else 's'}; selection "
        f"{selection:.2f} ms" + (f" ({used})" if used else "") + f", vision encoder "
        f"{record.seconds.get(MODEL_STAGE, 0.0) * 1e3:.2f} ms"
    )
    table = [_COLUMNS] + [
        (
            str(r.sample),
            str(r.items),
            str(r.visual_in),
            str(r.visual_llm_input),
            f"{r.visual_layer_mean:.1f}",
            str(r.budget),
            "yes" if r.on_budget else f"no ({r.budget_gap:+.1f})",
            format_flops(r.prefill_flops),
            format_flops(r.prefill_flops_unpruned),
            "-" if r.flops_ratio is None else f"{r.flops_ratio:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = [head] + ["  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
    lines += [f"  note: {n}" for n in record.notes]
    return "\n".join(lines)
