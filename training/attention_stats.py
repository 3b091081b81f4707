"""Where a vision tower's attention goes: mass on informative vs background patches, per layer (issue 20, item 3).

For a model (a bundled trained one or any supported VLM with its processor) and the first `n` test samples of a
synthetic dataset version, every tower layer's attention probabilities are recomputed from that layer's own q / k
projections on the hidden states captured by forward pre-hooks (no eager attention, no `output_attentions`; the
helpers of `tokenzip.signals.attention`), averaged over heads, and split by the generator's ground truth into the
mass that lands on *informative* patches (patch cells overlapping the content the question needs:
`truth.coverage(needed_raster) > 0` pooled onto the patch grid of each image / tile) and the rest. This is a
measured property of a tower, never a training target.

Per layer and view (LLaVA: "image"; Qwen2.5-VL: "image"; OneVision: "base", the whole image at tile size, and
"tiles", the high-resolution tiles, each pooled over its own box of the image):

* ``area``: informative area share = fraction of the view's patches that are informative (mean over samples).
* ``cls_mass`` (LLaVA only: the row HiPrune / HoloV / VisionZip read): attention mass of the CLS query on
  informative patches; ``cls_sink`` its mass on the CLS key itself (informative + background + sink = 1).
* ``query_mass``: the same mass averaged over all patch queries (the "attention received" policies read).
* ``cls_ratio`` / ``query_ratio``: concentration against area. Per query, the share of its *patch-directed* mass
  that lands on informative patches, averaged over queries and samples, divided by the mean informative share of
  the patches that query can see (its whole image / tile, or its window in Qwen2.5-VL's windowed blocks, where
  attention stays inside `cu_seqlens` segments exactly as the block computes it). 1.0 = attention no more
  concentrated on the needed content than its area; uniform attention gives exactly 1 in every layer kind.

Sample averages are ratios of means over samples (samples whose question needs nothing, e.g. an absent object,
add 0 to both numerator and denominator). Geometry of the bundles (`training/architectures.py`): LLaVA CLIP
192 px / 16 px -> 12 x 12 patches + CLS; Qwen2.5-VL 280 px / 14 px -> 20 x 20 patches in the tower's
window-permuted order, windows of 10 x 10 patches except in the full-attention blocks; OneVision SigLIP 96 px tiles
(6 x 6 patches), the base image plus a 2 x 2 tile grid for the square synthetic images.

Run: ``python -m tokenzip.synthetic.attention_stats --model DIR --n 64 [--version v2] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tokenzip.adapters import get_adapter
from tokenzip.errors import UnsupportedInputError
from tokenzip.signals.attention import encoder_attention_rows, qwen_vision_qk
from tokenzip.synthetic.dataset import RENDER_SIDE, VERSIONS, Sample, sample
from tokenzip.synthetic.evaluate import messages_for
from tokenzip.synthetic.truth import coverage, needed_raster


@dataclass
class QueryMasses:
    """Per-query attention split of one layer, head-averaged probabilities.

    Shapes: [R, T] for CLIP / SigLIP rows (T tokens per row, CLS first where present) or [N] for Qwen2.5-VL's
    packed tokens (tower order). `informative` + `background` + `cls_key` = 1 per query; `baseline` = the
    informative share of the patch keys that query may attend to (what uniform attention would give)."""

    informative: torch.Tensor
    background: torch.Tensor
    cls_key: torch.Tensor
    baseline: torch.Tensor

    @property
    def concentration(self) -> torch.Tensor:
        """Share of the patch-directed mass on informative patches (0 where a query sends nothing to patches)."""
        patch = self.informative + self.background
        return torch.where(patch > 0, self.informative / patch.clamp_min(1e-30), torch.zeros_like(patch))


@dataclass
class LayerStats:
    """One row of the report (sample means; see the module docstring). `cls_*` are None without a CLS token."""

    layer: int
    view: str
    attention: str  # "full" or "window"
    area: float
    cls_mass: float | None
    cls_sink: float | None
    cls_ratio: float | None
    query_mass: float
    query_ratio: float


def vit_query_masses(
    attn: torch.nn.Module, hidden_states: torch.Tensor, informative: torch.Tensor, has_cls: bool
) -> QueryMasses:
    """Attention split of a CLIP / SigLIP layer. hidden_states: the attention module's input [R, T, D];
    informative: bool [R, P] per row's patches (P = T - 1 with a CLS token first, else T). Returns [R, T] tensors."""
    offset = int(has_cls)
    probs = encoder_attention_rows(attn, hidden_states, slice(0, hidden_states.shape[1]))  # [R, T, T]
    inf = informative.to(probs)
    if inf.shape[-1] != probs.shape[-1] - offset:
        raise UnsupportedInputError(
            f"{inf.shape[-1]} informative flags per row for {probs.shape[-1] - offset} patch tokens"
        )
    patch = probs[..., offset:]
    on_inf = patch @ inf[..., None]  # [R, T, 1]
    cls_key = probs[..., 0] if has_cls else torch.zeros_like(probs[..., 0])
    baseline = inf.mean(-1, keepdim=True).expand_as(cls_key)
    return QueryMasses(on_inf[..., 0], patch.sum(-1) - on_inf[..., 0], cls_key, baseline)


def qwen_query_masses(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    informative: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> QueryMasses:
    """Attention split of a Qwen2.5-VL vision block, inside each `cu_seqlens` segment (window or image) as the block
    computes it. hidden_states: [N, D] (after `norm1`, tower order); informative: bool [N] in the same order.
    Returns [N] tensors. Memory O(H * N^2): one image at a time."""
    q, k = qwen_vision_qk(attn, hidden_states, position_embeddings)  # [H, N, hd], float32
    n = hidden_states.shape[0]
    bounds = cu_seqlens.to(hidden_states.device).long()
    segment = torch.bucketize(torch.arange(n, device=hidden_states.device), bounds[1:], right=True)  # [N]
    same = segment[:, None] == segment[None, :]  # [N, N] block-diagonal: attention never crosses a segment
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # [H, N, N]
    probs = torch.softmax(logits.masked_fill(~same, float("-inf")), dim=-1).mean(0)  # [N, N]
    inf = informative.float()
    on_inf = probs @ inf
    baseline = (same.float() @ inf) / same.sum(-1)  # informative share of each query's segment
    return QueryMasses(on_inf, probs.sum(-1) - on_inf, torch.zeros_like(inf), baseline)


def qwen_tower_raster(grid_thw: tuple[int, int, int], config: Any) -> torch.Tensor:
    """For one image: the raster index (row * w + col over the h x w patch grid) of the patch at each position of
    the Qwen2.5-VL tower's window-permuted order. config: the vision config. Returns LongTensor [t * h * w]."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    m = int(config.spatial_merge_size)
    grid = torch.tensor([grid_thw])
    pos = get_vision_position_ids(grid, m)  # [N, 2] (row, col) in the processor's merge-unit-major order
    window_index, _ = get_vision_window_index(grid, m, config.window_size, config.patch_size)
    pos = pos.reshape(-1, m * m, 2)[window_index].reshape(-1, 2)  # as the tower permutes its tokens
    return pos[:, 0] * grid_thw[2] + pos[:, 1]


def ov_tile_grid(image_size: tuple[int, int], config: Any) -> tuple[int, int]:
    """(rows, cols) of OneVision's high-resolution tile grid for an image of `image_size` (height, width); only
    grids whose tiles exactly partition the image (square image, square grid) are measured."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    rows, cols = get_anyres_image_grid_shape(
        list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
    )
    if image_size[0] != image_size[1] or rows != cols:
        raise UnsupportedInputError(
            f"OneVision image of {tuple(image_size)} px on a {rows} x {cols} tile grid: tile boxes are defined "
            "only for square images on square grids (the synthetic images are square)"
        )
    return rows, cols


def view_informative(family: str, truth: torch.Tensor, model: Any, inputs: dict) -> dict[str, torch.Tensor]:
    """Informative flags per view, in the tower's token order (patches only, no CLS).

    truth: [1, H, W] coverage raster of one image. Returns {view: bool [rows, patches]} for CLIP / SigLIP
    (rows = tower rows of the view) or {"image": bool [N]} (tower order) for Qwen2.5-VL."""
    vcfg = model.config.vision_config
    if family == "qwen2_5_vl":
        t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        flags = coverage(truth, 1, h, w) > 0
        return {"image": flags[qwen_tower_raster((t, h, w), vcfg)]}
    g = vcfg.image_size // vcfg.patch_size
    base = (coverage(truth, 1, g, g) > 0)[None]
    if family == "llava":
        return {"image": base}
    rows, cols = ov_tile_grid(tuple(int(x) for x in inputs["image_sizes"][0]), model.config)
    if rows * cols == 1:
        return {"base": base}
    side_h, side_w = truth.shape[1] // rows, truth.shape[2] // cols
    if side_h * rows != truth.shape[1] or side_w * cols != truth.shape[2]:
        raise UnsupportedInputError(f"truth raster {tuple(truth.shape[1:])} not divisible into {rows} x {cols} tiles")
    tiles = truth.unflatten(1, (rows, side_h)).unflatten(3, (cols, side_w))  # [1, rows, sh, cols, sw]
    tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, side_h, side_w)  # row-major tiles, as the processor
    return {"base": base, "tiles": (coverage(tiles, rows * cols, g, g) > 0).view(rows * cols, g * g)}


class _Capture:
    """Forward pre-hooks that keep each vision attention module's input (hidden states and keyword arguments)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, dict]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(modules)]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[layer] = (hidden.detach(), dict(kwargs))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _view_rows(family: str) -> dict[str, slice]:
    if family == "llava_onevision":
        return {"base": slice(0, 1), "tiles": slice(1, None)}
    return {"image": slice(None)}


@torch.no_grad()
def sample_masses(model: Any, processor: Any, item: Sample) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Informative flags per view and, per tower layer, `QueryMasses` per view for one sample (batch of 1)."""
    adapter = get_adapter(model)
    family = adapter.family
    prompt = processor.apply_chat_template(messages_for(item.question.text), add_generation_prompt=True)
    inputs = processor(images=[item.image(RENDER_SIDE)], text=[prompt], return_tensors="pt")
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    layers = list(adapter.vision_layers)
    capture = _Capture([adapter.vision_attention(i) for i in range(len(layers))])
    try:
        model(**inputs)
    finally:
        capture.remove()
    views = view_informative(family, needed_raster(item), model, inputs)
    out = []
    for layer in range(len(layers)):
        hidden, kwargs = capture.inputs[layer]
        attn = adapter.vision_attention(layer)
        if family == "qwen2_5_vl":
            inf = views["image"].to(hidden.device)
            masses = qwen_query_masses(attn, hidden, inf, kwargs["cu_seqlens"], kwargs["position_embeddings"])
            out.append({"image": masses})
            continue
        if kwargs.get("attention_mask") is not None:
            raise UnsupportedInputError("vision tower called with an attention mask; only unpadded images are measured")
        per_view = {}
        for view, rows in _view_rows(family).items():
            if view not in views:
                continue
            per_view[view] = vit_query_masses(attn, hidden[rows], views[view].to(hidden.device), adapter.vision_has_cls)
        out.append(per_view)
    return views, out


def _attention_kinds(model: Any) -> list[str]:
    adapter = get_adapter(model)
    full = set(adapter.full_attention_layers())
    return ["full" if i in full else "window" for i in range(len(adapter.vision_layers))]


def measure(model: Any, processor: Any, n: int = 64, version: str = "v2", split: str = "test") -> list[LayerStats]:
    """Per tower layer and view, the attention statistics of the module docstring over the first `n` samples of
    `split` of dataset `version`."""
    if version not in VERSIONS:
        raise UnsupportedInputError(f"dataset version {version!r}; choose one of {list(VERSIONS)}")
    if n < 1:
        raise UnsupportedInputError(f"n={n}: measure at least 1 sample")
    adapter = get_adapter(model)
    has_cls = adapter.vision_has_cls
    kinds = _attention_kinds(model)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    # per sample and (layer, view): area, cls mass, cls sink, cls concentration, query mass, query concentration,
    # query baseline
    for i in range(n):
        views, layers = sample_masses(model, processor, sample(split, i, version=version))
        for layer, per_view in enumerate(layers):
            for view, qm in per_view.items():
                area = views[view].float().mean()
                if qm.informative.dim() == 2:  # CLIP / SigLIP rows: patch queries skip the CLS row
                    q = slice(int(has_cls), None)
                    query = [qm.informative[:, q], qm.concentration[:, q], qm.baseline[:, q]]
                    cls = [qm.informative[:, 0].mean(), qm.cls_key[:, 0].mean(), qm.concentration[:, 0].mean()]
                else:
                    query = [qm.informative, qm.concentration, qm.baseline]
                    cls = [torch.tensor(0.0)] * 3
                row = torch.stack([area.cpu(), *(c.cpu() for c in cls), *(x.mean().cpu() for x in query)])
                sums[(layer, view)] = sums.get((layer, view), 0) + row.double()
    out = []
    for (layer, view), total in sorted(sums.items()):
        area, cls_mass, cls_sink, cls_conc, q_mass, q_conc, q_base = (total / n).tolist()
        out.append(
            LayerStats(
                layer=layer,
                view=view,
                attention=kinds[layer],
                area=area,
                cls_mass=cls_mass if has_cls else None,
                cls_sink=cls_sink if has_cls else None,
                cls_ratio=_ratio(cls_conc, area) if has_cls else None,
                query_mass=q_mass,
                query_ratio=_ratio(q_conc, q_base),
            )
        )
    return out


def _ratio(mass: float, area: float) -> float:
    return mass / area if area > 0 else math.nan


def report(model_dir: str, n: int = 64, version: str = "v2") -> dict[str, Any]:
    """The measurement of `model_dir` (a bundled name or a directory) as a JSON-ready dict."""
    from ..loading import load_vlm

    model, processor = load_vlm(model_dir, dtype="float32")
    adapter = get_adapter(model)
    rows = measure(model, processor, n=n, version=version)
    return {
        "model": str(model_dir),
        "family": adapter.family,
        "version": version,
        "n": n,
        "vision_layers": len(adapter.vision_layers),
        "vision_feature_layer": adapter.vision_feature_layer,
        "layers": [asdict(r) for r in rows],
    }


def table(result: dict[str, Any]):
    """A `rich` table of `report`'s result."""
    from rich.table import Table

    t = Table(
        title=f"{result['model']} ({result['family']}): tower attention on informative patches, "
        f"{result['n']} test samples of {result['version']}; ratio 1 = no more concentrated than area; the "
        f"projector reads layer {result['vision_feature_layer']} of {result['vision_layers']}"
    )
    for col in ("layer", "view", "attn", "inf. area", "CLS mass", "CLS sink", "CLS ratio", "query mass", "ratio"):
        t.add_column(col, justify="left" if col in ("view", "attn") else "right")

    def f(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for r in result["layers"]:
        t.add_row(
            str(r["layer"]),
            r["view"],
            r["attention"],
            f(r["area"]),
            f(r["cls_mass"]),
            f(r["cls_sink"]),
            f(r["cls_ratio"], 2),
            f(r["query_mass"]),
            f(r["query_ratio"], 2),
        )
    return t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundled model name (synth-llava, ...) or model directory")
    parser.add_argument("--n", type=int, default=64, help="first n test samples")
    parser.add_argument("--version", default="v2", choices=list(VERSIONS), help="synthetic dataset version")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    from rich.console import Console

    result = report(args.model, n=args.n, version=args.version)
    Console(width=140).print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
