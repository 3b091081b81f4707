"""Context dropout while training the bundled tiny models (training only; not part of the shipped model).

A real VLM answers from the few tokens that show what the question is about, whatever else the image holds: that
is why pruning most of an image costs real models little. A tiny model trained on full grids only learns shortcuts
through the rest of the grid instead. The 20-layer LLaVA counted relative to the other objects (given only the
tokens of the counted objects it answered the largest count every time) and read positions and glyphs off
whole-grid statistics, so any selector lost accuracy, the perfect one (`oracle`) included: it kept 74 %.

So in a share of the training images (`context_plan`), the conversation keeps only its first 1 to `MAX_TURNS`
questions and a random part of the visual tokens that none of them needs (`truth.needed`: cells holding no pixel
of it) is masked out of the LLM's attention. The answers stay true, since everything they depend on stays; what
varies is how much of the rest of the image surrounds it. The rule reads the generator's ground truth, never a
policy's score. Families whose pruning compacts positions by default (the adapter's `supports_compact_positions`:
LLaVA, OneVision) get contiguous position ids over the tokens left, as the pre-LLM runtime gives them; Qwen2.5-VL
keeps its original M-RoPE ids.
"""

from __future__ import annotations

import torch

from tokenzip.synthetic.truth import coverage, needed, raster

MAX_TURNS = 4  # questions a dropped-out conversation keeps, at most


def context_plan(count: int, share: float, generator: torch.Generator) -> list[tuple[int, float] | None]:
    """Per sample of a batch: None (full grid, full conversation) or (questions kept k in 1..MAX_TURNS, share f of
    the unneeded tokens to hide); a sample is dropped out with probability `share`. f is 1 (only what the questions
    need is left, as a perfect selector leaves it) with probability 1/2, else f ~ U(0, 1)."""
    if not 0 <= share <= 1:
        raise ValueError(f"context dropout share must be in [0, 1], got {share}")
    plan: list[tuple[int, float] | None] = []
    for _ in range(count):
        chosen = bool(torch.rand((), generator=generator) < share)
        k = int(torch.randint(1, MAX_TURNS + 1, (), generator=generator))
        f = 1.0 if torch.rand((), generator=generator) < 0.5 else float(torch.rand((), generator=generator))
        plan.append((k, f) if chosen else None)
    return plan


def unneeded_cells(scene, questions: list, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols] bool, raster order: cells of a rows x cols grid over the whole image of `scene` that hold no
    pixel (`truth.raster`) of anything one of `questions` needs."""
    things = [t for q in questions for t in needed(scene, q)]
    return coverage(raster(things).float()[None], 1, rows, cols) == 0


def dropout_mask(
    attention_mask: torch.Tensor,
    grids: list[list[tuple[torch.Tensor, int, int]]],
    scenes: list,
    questions: list[list],
    plan: list[tuple[int, float] | None],
    generator: torch.Generator,
) -> torch.Tensor:
    """attention_mask [B, S] with, in each sample b planned (k, f), round(f * n) of its n visual tokens that none
    of `questions[b]` needs set to 0, uniformly at random (the same f for all its grids).

    `grids[b]` lists sample b's grids over the whole image (`train.visual_grids`: sequence positions [rows * cols]
    in raster order, rows, cols); `questions[b]` are the questions its conversation asks (already cut to k)."""
    out = attention_mask.clone()
    for b, step in enumerate(plan):
        if step is None:
            continue
        for positions, rows, cols in grids[b]:
            candidates = positions[unneeded_cells(scenes[b], questions[b], rows, cols)]
            order = torch.randperm(candidates.numel(), generator=generator)
            out[b, candidates[order[: round(step[1] * candidates.numel())]]] = 0
    return out


def position_ids(model, batch: dict, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a forward with the dropped-out `attention_mask`: contiguous over the attended tokens for a
    compacting family ([B, S]), the M-RoPE ids of the full sequence for Qwen2.5-VL (`get_rope_index` on the
    processor's own mask)."""
    from tokenzip.adapters import get_adapter

    if get_adapter(model).supports_compact_positions:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch["attention_mask"],
    )
    return ids
