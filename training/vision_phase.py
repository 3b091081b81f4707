"""First training phase of the bundled tiny models: the vision side alone, on the per-cell scene labels.

Trained end to end from the answer words, the vision tower learns colour at once but the shape of the object under
a cell, the glyph and the cell's position only after thousands of steps, and until it does every question except
colour lookup is at chance (the language model has nothing to route). This phase trains the vision tower and the
projector (for Qwen2.5-VL the whole `visual` module, merger included) with the `DenseHeads` alone, about three
times faster per step than the full model, so that the question-answering phase starts from tokens that already
say what is where. The language model is untouched here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenzip.synthetic.dataset import RENDER_SIDE, SPLITS, sample

from .budget import StepBudget, cosine_lr
from .dense import DenseHeads


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """Everything of the VLM except the language model and the output head (tower, projector / merger, newline)."""
    return [p for name, p in model.model.named_parameters() if not name.startswith("language_model.")]


def tower_parameters(model, trainable_layers: int = 0) -> list[torch.nn.Parameter]:
    """The vision encoder (the tower of LLaVA / OneVision, Qwen2.5-VL's `visual` without its merger) minus its
    last `trainable_layers` layers that feed the visual features: what the question-answering phase freezes.

    LLaVA-1.5 takes its features from layer -2, so the tower's last layer is unused and "the last feeding layer"
    is the one before it.
    """
    inner = model.model
    if hasattr(inner, "vision_tower"):
        tower, layers = inner.vision_tower, inner.vision_tower.encoder.layers
        feature_layer = getattr(model.config, "vision_feature_layer", -1)
        used = len(layers) + 1 + feature_layer if feature_layer < 0 else feature_layer
        prefix = "encoder.layers."
    else:
        tower = inner.visual
        used = len(tower.blocks)
        prefix = "blocks."
    trainable = {f"{prefix}{k}." for k in range(max(0, used - trainable_layers), used)}
    return [
        p
        for name, p in tower.named_parameters()
        if not name.startswith("merger.") and not any(name.startswith(t) for t in trainable)
    ]


def image_batch(processor, indices: list[int], seed: int, version: str = "v1") -> tuple[dict, list]:
    """Image-processor inputs and scenes of train samples `indices` (wrapping around the split) of `version`."""
    picked = [sample("train", i % SPLITS["train"], seed, version) for i in indices]
    inputs = dict(processor.image_processor([s.image(RENDER_SIDE) for s in picked], return_tensors="pt"))
    return inputs, [s.scene for s in picked]


def pretrain_vision(
    model,
    processor,
    heads: DenseHeads,
    tokens: Callable[[], torch.Tensor],
    labels: Callable[[list], torch.Tensor],
    seconds: float,
    *,
    max_steps: int = 100_000,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup: int = 100,
    weight_decay: float = 0.05,
    seed: int = 0,
    log_every: int = 50,
    verbose: bool = True,
    version: str = "v1",
    global_heads=None,
    global_tap=None,
    global_weight: float = 1.0,
) -> list[dict]:
    """Train the vision side and `heads` for `seconds` (or `max_steps`); returns the log (step, minutes, loss and
    the heads' accuracy on each logged batch before its update).

    `tokens()` returns the visual tokens [N, D] of the last forward (`train.VisualTap`), `labels(scenes)` the
    matching [5, N] cell labels (`train.dense_labels`). With `global_heads` (`global_heads.GlobalHeads`) and
    `global_tap` (`global_heads.GlobalTap`), the image-level objective is added with weight `global_weight`.
    """
    extra = list(global_heads.parameters()) if global_heads is not None else []
    params = [*vision_parameters(model), *heads.parameters(), *extra]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    budget = StepBudget(seconds, max_steps)
    log, step = [], 0
    while step < budget.total:
        indices = list(range(step * batch_size, (step + 1) * batch_size))
        inputs, scenes = image_batch(processor, indices, seed, version)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, budget.total, lr, warmup)
        if global_tap is not None:
            global_tap.images = len(scenes)
        model.model.get_image_features(**inputs)
        target = labels(scenes)
        loss = heads.loss(tokens(), target)
        if global_heads is not None:
            loss = loss + global_weight * global_heads.loss(global_tap.vectors, scenes)
        step += 1
        if step % log_every == 0 or step == budget.total:
            entry = {"step": step, "minutes": round(budget.elapsed / 60, 2), "loss": round(loss.item(), 4)}
            entry.update(heads.accuracy(tokens().detach(), target))
            if global_heads is not None:
                entry.update(global_heads.accuracy(global_tap.vectors.detach(), scenes))
            log.append(entry)
            if verbose:
                print("vision", entry, flush=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.tick(step)
    return log


__all__ = ["image_batch", "pretrain_vision", "tower_parameters", "vision_parameters"]
