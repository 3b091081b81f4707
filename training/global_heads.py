"""Image-level objective for the bundled vision towers (training only; the heads are not part of the shipped model).

Real CLIP and SigLIP towers are trained with an image-level objective (contrastive image-caption), so their global
path -- CLIP's CLS token, a pooled or mean token -- must gather what the image shows, which is what concentrates
their attention on salient content. Per-cell heads alone (`dense.DenseHeads`) never ask any token to summarise the
image. Here linear heads read the tower's global vector and predict multi-label scene attributes: which
(colour, shape) pairs are present, how many objects of each shape there are, and which glyph is printed. No term
looks at attention or at any signal a policy reads; where the tower puts its attention is left to the optimiser and
measured afterwards (`tokenzip.synthetic.attention_stats`).

The global vector per image (`GlobalTap`):

* LLaVA-1.5 (CLIP): the tower's `pooler_output`, the post-layer-norm CLS of its last layer;
* LLaVA-OneVision (SigLIP, no pooling head): the mean of the last hidden states of the image's base view;
* Qwen2.5-VL: the mean of the last vision block's outputs over the image's patches (before the merger).
"""

from __future__ import annotations

import torch

from tokenzip.synthetic.questions import NUMBER_WORDS
from tokenzip.synthetic.scenes import COLORS, GLYPHS, SHAPES, Scene

PAIRS = [(c, s) for c in COLORS for s in SHAPES]
MAX_COUNT = len(NUMBER_WORDS) - 1


def scene_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scene: present (colour, shape) pairs [B, 24] float 0/1, objects per shape [B, 4] long (capped at
    MAX_COUNT), glyph class [B] long (0 = none, else 1 + index in GLYPHS)."""
    present = torch.zeros(len(scenes), len(PAIRS))
    counts = torch.zeros(len(scenes), len(SHAPES), dtype=torch.long)
    glyph = torch.zeros(len(scenes), dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            present[b, PAIRS.index((obj.color, obj.shape))] = 1.0
            counts[b, SHAPES.index(obj.shape)] += 1
        if scene.glyph is not None:
            glyph[b] = GLYPHS.index(scene.glyph.char) + 1
    return present, counts.clamp(max=MAX_COUNT), glyph


class GlobalHeads(torch.nn.Module):
    """Linear presence / count / glyph heads over global vectors [B, D] (training only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.present = torch.nn.Linear(dim, len(PAIRS))
        self.count = torch.nn.Linear(dim, len(SHAPES) * (MAX_COUNT + 1))
        self.glyph = torch.nn.Linear(dim, len(GLYPHS) + 1)

    def loss(self, vectors: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
        """Mean of the presence BCE, the per-shape count cross-entropy and the glyph cross-entropy."""
        present, counts, glyph = (t.to(vectors.device) for t in scene_targets(scenes))
        f = torch.nn.functional
        bce = f.binary_cross_entropy_with_logits(self.present(vectors).float(), present)
        count_logits = self.count(vectors).float().view(len(scenes), len(SHAPES), MAX_COUNT + 1)
        count = f.cross_entropy(count_logits.flatten(0, 1), counts.flatten())
        return (bce + count + f.cross_entropy(self.glyph(vectors).float(), glyph)) / 3

    @torch.no_grad()
    def accuracy(self, vectors: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
        """Exact-set presence, per-shape count and glyph accuracy on a batch."""
        present, counts, glyph = scene_targets(scenes)
        sets = ((self.present(vectors) > 0).float().cpu() == present).all(-1).float().mean()
        count_logits = self.count(vectors).view(len(scenes), len(SHAPES), MAX_COUNT + 1)
        count = (count_logits.argmax(-1).cpu() == counts).float().mean()
        glyphs = (self.glyph(vectors).argmax(-1).cpu() == glyph).float().mean()
        return {
            "g_present": round(sets.item(), 4),
            "g_count": round(count.item(), 4),
            "g_glyph": round(glyphs.item(), 4),
        }


class GlobalTap:
    """Captures one global vector per image of the last vision forward (a forward hook), see the module docstring."""

    def __init__(self, model, family: str) -> None:
        self.family = family
        self.vectors: torch.Tensor | None = None
        inner = model.model
        if family == "qwen2_5_vl":
            self.dim = inner.visual.config.hidden_size
            self.handle = inner.visual.blocks[-1].register_forward_hook(self._qwen)
        else:
            self.dim = inner.vision_tower.config.hidden_size
            hook = self._clip if family == "llava" else self._siglip
            self.handle = inner.vision_tower.register_forward_hook(hook)
        self.images = 0  # images of the current forward (set by the caller before the forward)

    def _clip(self, module, args, output) -> None:
        self.vectors = output.pooler_output

    def _siglip(self, module, args, output) -> None:
        hidden = output.last_hidden_state  # [views, P, D]: each image's base view first, then its tiles
        per_image = hidden.shape[0] // max(1, self.images)
        self.vectors = hidden[::per_image].mean(1)

    def _qwen(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # [N patches of all images, D]
        self.vectors = hidden.view(max(1, self.images), -1, hidden.shape[-1]).mean(1)

    def remove(self) -> None:
        self.handle.remove()
