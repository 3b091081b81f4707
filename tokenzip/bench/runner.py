"""Measuring policies side by side: `run_bench`.

For every (policy, keep) row, with the patch applied to the one loaded model:

* **TTFT** is the wall time of `generate(max_new_tokens=1)` (what a user waits for), split with the per-stage
  seconds the patch records: *vision encoder* (the feature call minus the policy's work inside it), *selection*
  (every scoring pass, signal recomputation, gather and merge of the policy, wherever it acts) and *LLM
  prefill* (the rest: embedding, decoder layers, lm_head, generate's own bookkeeping).
* The **oracle** is the same patch replaying the decisions it has just recorded (`Patch.replay`): no signal is
  recomputed and no policy code runs; the model gets exactly the same kept tokens at every layer. It is the
  physical limit of any policy reaching those per-layer lengths with tokenzip's gathers; `overhead = policy
  TTFT / oracle TTFT` is what the policy's selection costs on top. Oracle and policy runs alternate (each oracle
  replays the policy run before it), so drift affects both alike.
* **decode tok/s** = batch x n / the time from the first to the (1 + n)-th generated token of one run.
* **FLOPs** are analytic (`tokenzip.flops`) from the tokens every component really processed in the recorded
  prefill; the policy's own scoring FLOPs are counted by `FlopCounterMode` and reported apart.
* **peak memory**: see `tokenzip.bench.timing.PeakMemory`; **agreement**: the fraction of the first 1 + n
  greedy tokens equal to the unpatched model's; **accuracy** and **retention** when an evaluator is given.
* **budget**: each sample's layer-averaged visual tokens against the sum over its items of `item_budget(keep,
  n_content)`; a row with a sample more than one token per item away is flagged off budget
  (`tokenzip.bench.checks`).
* **noise and the control**: every time is a `Summary` of the repeats (median, quartiles, range); its `spread`
  (interquartile range from 4 repeats on, the range below) is the noise. The first row, policy ``none`` at keep
  1.0, is the control: its policy runs, its replays and the model without hooks (`BenchResult.unpatched_ttft`,
  timed before any patch) do the same work, so medians further apart than their noise flag the control, and
  every overhead on the table is only as good as it. A policy row whose TTFT and oracle medians lie within their
  noise has `overhead_resolved = False` (its overhead is indistinguishable from 1).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..api import apply
from ..budget import Keep, validate_keep
from ..engine.accounting import measure_flops
from ..errors import TokenzipError
from ..flops import breakdown_of_record
from .checks import budget_note, check_record
from .models import BenchModel, Workload
from .timing import PeakMemory, Summary, differs, synchronize, timed

STAGE_MODEL = "vision_encoder"  # the only per-stage entry of a record that is model work


@dataclass
class BenchSettings:
    """What to run: policies x keeps (+ the unpruned reference), options per policy, and how often."""

    policies: list[str]
    keeps: list[Keep]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    warmup: int = 1
    repeats: int = 5
    decode_tokens: int = 16
    count_flops: bool = True

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.decode_tokens < 0:
            raise ValueError(
                f"warmup must be >= 0, repeats >= 1 and decode_tokens >= 0 (got {self.warmup}, {self.repeats}, "
                f"{self.decode_tokens})"
            )
        self.keeps = [validate_keep(k) for k in self.keeps]
        if any(str(p).lower() == "oracle" for p in self.policies):
            raise ValueError(
                "policy 'oracle' cannot be benchmarked: it reads the synthetic generator's ground truth, which the "
                "bench inputs do not have; score it with `tokenzip eval` on tokenzip's synthetic tasks"
            )


@dataclass
class BenchRow:
    """One policy at one keep (see the module docstring for each measure). Times in seconds, memory in bytes."""

    policy: str
    keep: Any
    error: str | None = None
    visual_tokens: float = 0.0  # visual tokens per sample before compression
    llm_input_tokens: float = 0.0  # visual tokens per sample entering the LLM
    layer_mean_tokens: float = 0.0  # visual tokens per sample, averaged over decoder layers
    budget_tokens: float = 0.0  # layer-averaged budget per sample (sum over items of item_budget(keep, n_content))
    off_budget: bool = False  # a sample's layer average is more than one token per item away from its budget
    flops: dict[str, int] = field(default_factory=dict)
    flops_ratio: float = float("nan")  # prefill model FLOPs / unpruned
    llm_flops_ratio: float = float("nan")
    measured_model_flops: int | None = None  # FlopCounterMode's count of the model's own work (check)
    ttft: Summary | None = None
    vision: Summary | None = None
    selection: Summary | None = None
    prefill: Summary | None = None
    oracle: Summary | None = None
    overhead: float = float("nan")  # ttft.median / oracle.median
    overhead_resolved: bool | None = None  # TTFT and oracle medians differ by more than their noise (None: 1 run)
    decode_tps: float = float("nan")
    peak_memory: int = 0
    added_memory: int = 0
    agreement: float = float("nan")
    accuracy: float | None = None
    retention: float | None = None
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # what makes this row's numbers suspect (off budget, control)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchResult:
    model: str
    description: str
    workload: Workload
    settings: BenchSettings
    machine: dict[str, str]
    unpatched_ttft: Summary  # the model without hooks, timed before any patch (compared with the control row)
    rows: list[BenchRow]

    @property
    def control(self) -> BenchRow | None:
        """The `none` row at keep 1.0 (the table's reference and timing control), when it ran."""
        first = self.rows[0] if self.rows else None
        return first if first is not None and first.policy == "none" and first.error is None else None

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "description": self.description,
            "workload": asdict(self.workload),
            "workload_text": self.workload.describe(),
            "settings": {**asdict(self.settings), "keeps": [str(k) for k in self.settings.keeps]},
            "machine": self.machine,
            "unpatched_ttft": asdict(self.unpatched_ttft),
            "rows": [r.as_dict() for r in self.rows],
        }


def machine_description(bm: BenchModel) -> dict[str, str]:
    """What the numbers were measured on."""
    import transformers

    dev = bm.device
    model = bm.model
    desc = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attention": str(model.config._attn_implementation),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if dev.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(dev)
    else:
        desc["cpu"] = platform.processor() or platform.machine()
    return desc


def _placeholders(model) -> list[int]:
    cfg = model.config
    ids = (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
    return [int(i) for i in ids if i is not None]


class StepClock:
    """A generate stopping criterion that never stops and notes when each new token is ready (synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def tokens_per_second(self, batch: int) -> float:
        """Decode speed after the first token: batch x (steps - 1) / their time."""
        if len(self.times) < 2:
            return float("nan")
        return batch * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def generate(model, inputs: dict, tokens: int, clock: StepClock | None = None) -> torch.Tensor:
    """Greedy generation of exactly `tokens` new tokens (placeholder ids suppressed). Returns [B, tokens]."""
    from transformers import StoppingCriteriaList

    extra = {"stopping_criteria": StoppingCriteriaList([clock])} if clock is not None else {}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            suppress_tokens=_placeholders(model),
            pad_token_id=0,
            **extra,
        )
    return out[:, inputs["input_ids"].shape[1] :]


def _split(record, ttft: float) -> tuple[float, float, float]:
    """(vision encoder, selection, LLM prefill) seconds of one policy run."""
    vision = record.seconds.get(STAGE_MODEL, 0.0)
    selection = sum(v for k, v in record.seconds.items() if k != STAGE_MODEL)
    return vision, selection, max(0.0, ttft - vision - selection)


def _measure_row(
    bm: BenchModel,
    inputs: dict,
    policy: str,
    keep: Keep,
    options: dict,
    settings: BenchSettings,
    reference: torch.Tensor,
    evaluator: Callable[[torch.nn.Module], float] | None,
) -> BenchRow:
    model, device = bm.model, bm.device
    row = BenchRow(policy, keep)
    n = settings.decode_tokens
    with apply(model, policy, keep, **options) as patch:
        for _ in range(settings.warmup):
            generate(model, inputs, 1)
            with patch.replay():
                generate(model, inputs, 1)
        ttft, vision, selection, prefill, oracle = [], [], [], [], []
        clock = StepClock(device)
        with PeakMemory(device) as memory:  # also the decode-speed and agreement run
            tokens = generate(model, inputs, 1 + n, clock)
        if settings.count_flops:
            counted = measure_flops(lambda: generate(model, inputs, 1))
            row.measured_model_flops = counted.model
            overhead_flops = counted.overhead
        else:
            overhead_flops = 0
        for _ in range(settings.repeats):
            with patch.replay():  # replays the decisions of the policy run just before
                oracle.append(timed(lambda: generate(model, inputs, 1), device)[0])
            seconds, _ = timed(lambda: generate(model, inputs, 1), device)
            record = patch.stats.last
            parts = _split(record, seconds)
            ttft.append(seconds)
            vision.append(parts[0])
            selection.append(parts[1])
            prefill.append(parts[2])
        if evaluator is not None:  # last: its prefills must not become the record the oracle replays
            row.accuracy = float(evaluator(model))
    samples = record.samples
    row.visual_tokens = sum(s.visual_in for s in samples) / len(samples)
    row.llm_input_tokens = sum(sum(it.kept + it.padded for it in s.items) for s in samples) / len(samples)
    row.layer_mean_tokens = sum(s.visual_mean for s in samples) / len(samples)
    checks = check_record(record)
    row.budget_tokens = sum(c.budget for c in checks) / max(1, len(checks))
    row.off_budget = any(c.off for c in checks)
    if row.off_budget:
        row.flags.append(budget_note(checks))
    row.notes = list(record.notes)
    row.flops = breakdown_of_record(model.config, record, lm_head_tokens=1, overhead=overhead_flops).as_dict()
    row.ttft, row.vision, row.selection = Summary.of(ttft), Summary.of(vision), Summary.of(selection)
    row.prefill, row.oracle = Summary.of(prefill), Summary.of(oracle)
    row.overhead = row.ttft.median / row.oracle.median
    row.overhead_resolved = differs(row.ttft, row.oracle)
    row.decode_tps = clock.tokens_per_second(tokens.shape[0])
    row.peak_memory, row.added_memory = memory.peak, memory.added
    row.agreement = float((tokens.cpu() == reference).float().mean())
    return row


def run_bench(
    bm: BenchModel,
    work: Workload,
    settings: BenchSettings,
    evaluator: Callable[[torch.nn.Module], float] | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
) -> BenchResult:
    """Measure the unpruned reference (policy "none", keep 1.0) and every policy x keep of `settings`.

    A row whose policy refuses the model, input or budget (a `TokenzipError`) is kept with its `error` message;
    any other exception propagates. `evaluator(model) -> accuracy` runs under each patch when given.
    """
    model, device = bm.model, bm.device
    inputs = bm.make_inputs(work)
    n = settings.decode_tokens
    for _ in range(settings.warmup):
        generate(model, inputs, 1)
    unpatched = Summary.of([timed(lambda: generate(model, inputs, 1), device)[0] for _ in range(settings.repeats)])
    reference = generate(model, inputs, 1 + n).cpu()
    plan = [("none", 1.0)] + [(p, k) for p in settings.policies if p != "none" for k in settings.keeps]
    rows: list[BenchRow] = []
    for policy, keep in plan:
        try:
            row = _measure_row(
                bm, inputs, policy, keep, settings.options.get(policy, {}), settings, reference, evaluator
            )
        except TokenzipError as err:
            row = BenchRow(policy, keep, error=f"{type(err).__name__}: {err}")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    _relative(rows)
    _control(rows[0], unpatched)
    return BenchResult(bm.name, bm.description, work, settings, machine_description(bm), unpatched, rows)


def _control(row: BenchRow, unpatched: Summary) -> None:
    """Flag the control row (`none`, keep 1.0) when its runs, its replays and the hook-free model disagree by more
    than their noise: same work, so a gap is drift or bias of the clock, and overheads below it mean nothing."""
    if row.error is not None or row.ttft is None:
        return
    pairs = [
        ("none", row.ttft, "its replay", row.oracle),
        ("the model without hooks", unpatched, "the replay", row.oracle),
    ]
    for name_a, a, name_b, b in pairs:
        if differs(a, b):
            noise = max(a.spread, b.spread) * 1e3
            row.flags.append(
                f"control: {name_a} {a.median * 1e3:.1f} ms vs {name_b} {b.median * 1e3:.1f} ms, more than the noise "
                f"({noise:.1f} ms)"
            )


def _relative(rows: list[BenchRow]) -> None:
    """FLOPs ratios and accuracy retention against the unpruned reference row (the first)."""
    base = rows[0]
    if base.error is not None:
        return
    for row in rows:
        if row.error is not None:
            continue
        row.flops_ratio = row.flops["prefill"] / base.flops["prefill"]
        row.llm_flops_ratio = row.flops["llm"] / base.flops["llm"] if base.flops["llm"] else math.nan
        if row.accuracy is not None and base.accuracy:
            row.retention = row.accuracy / base.accuracy
