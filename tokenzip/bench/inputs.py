"""Model inputs built by hand for models without a processor (random-weight, real-shaped models).

A random-weight model built from a built-in config has no tokenizer or image processor offline, so the prompt
is assembled directly: random text ids around the exact number of placeholder tokens the model expects for the
requested images / video (taken from the adapter's item geometry, the same one `tokenzip flops` prices), and
random pixels of the right shape. Timing and FLOPs depend only on these shapes.
"""

from __future__ import annotations

import torch

from ..adapters import get_adapter
from ..pricing import workload

TEXT_ID_RANGE = (1000, 20000)  # ordinary vocabulary ids in every built-in tokenizer


def _special_ids(config) -> set[int]:
    names = ("image_token_id", "video_token_id", "image_token_index", "video_token_index", "vision_start_token_id")
    ids = {int(getattr(config, n)) for n in names if getattr(config, n, None) is not None}
    return ids | {i + 1 for i in ids}  # <|vision_end|> and neighbours


def _text_sampler(config, generator: torch.Generator):
    """Random ordinary text ids: within TEXT_ID_RANGE (clipped to the vocabulary), never a special id."""
    vocab = config.get_text_config().vocab_size
    low, high = min(TEXT_ID_RANGE[0], vocab // 4), min(TEXT_ID_RANGE[1], vocab)
    special = torch.tensor(sorted(_special_ids(config)))
    safe = next(i for i in range(low, high) if i not in set(special.tolist()))

    def sample(n: int) -> torch.Tensor:
        ids = torch.randint(low, high, (n,), generator=generator)
        return torch.where(torch.isin(ids, special), torch.tensor(safe), ids)

    return sample


def synthetic_inputs(
    model,
    images: int = 1,
    image_size: tuple[int, int] | None = None,
    frames: int = 0,
    text_tokens: int = 60,
    batch: int = 1,
    seed: int = 0,
) -> dict:
    """Inputs for `batch` identical prompts: `text_tokens` text ids, then the visual placeholders, then the rest.

    Returns the keyword arguments of the model's forward / generate (`input_ids` [B, L], `attention_mask`,
    pixel tensors and the grid / size tensors of the family).
    """
    if batch < 1 or images < 0 or frames < 0 or text_tokens < 2:
        raise ValueError(
            f"batch must be >= 1, images and frames >= 0, text_tokens >= 2 (got batch={batch}, images={images}, "
            f"frames={frames}, text_tokens={text_tokens})"
        )
    if not frames and images == 0:
        raise ValueError("synthetic inputs need at least one image or a video (frames > 0)")
    adapter = get_adapter(model)
    config = model.config
    work = workload(model, images=images, image_size=image_size, frames=frames, text_tokens=text_tokens)
    g = torch.Generator().manual_seed(seed)
    _text = _text_sampler(config, g)
    family = adapter.family
    modality = "video" if frames else "image"
    pieces: list[torch.Tensor] = [_text(text_tokens // 2)]
    extra: dict[str, torch.Tensor] = {}
    if family == "qwen2_5_vl":
        placeholder = config.video_token_id if frames else config.image_token_id
        start = config.vision_start_token_id
        end = start + 1  # <|vision_end|> follows <|vision_start|> in the Qwen2.5-VL vocabulary
        for shape in work.shapes:
            pieces += [torch.tensor([start]), torch.full((shape.length,), placeholder), torch.tensor([end])]
        vcfg = config.vision_config
        rows = sum(t * h * w for t, h, w in work.qwen_grids)
        flat = torch.randn(rows, 3 * vcfg.temporal_patch_size * vcfg.patch_size**2, generator=g)
        grids = torch.tensor(work.qwen_grids)
        if frames:
            extra.update(pixel_values_videos=flat, video_grid_thw=grids, second_per_grid_ts=torch.ones(len(grids)))
        else:
            extra.update(pixel_values=flat, image_grid_thw=grids)
    else:
        key = "video_token_index" if frames else "image_token_index"
        placeholder = getattr(config, key, None)
        if placeholder is None:
            placeholder = getattr(config, key.replace("_index", "_id"))
        for shape in work.shapes:
            pieces += [torch.full((shape.length,), placeholder), _text(1)]
        side = config.vision_config.image_size
        if family == "llava":
            extra["pixel_values"] = torch.randn(images, 3, side, side, generator=g)
        elif frames:
            extra["pixel_values_videos"] = torch.randn(1, frames, 3, side, side, generator=g)
        else:
            h, w = image_size or (768, 768)
            sizes = torch.tensor([[h, w]] * images)
            args = {"image_sizes": sizes, "batch_num_images": torch.tensor([images])}
            tiles = adapter._tiles_per_image(args)
            extra.update(
                pixel_values=torch.randn(images, max(tiles), 3, side, side, generator=g),
                image_sizes=sizes,
                batch_num_images=torch.tensor([images]),
            )
    pieces.append(_text(text_tokens - text_tokens // 2))
    ids = torch.cat(pieces)[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "qwen2_5_vl":
        out["mm_token_type_ids"] = (ids == placeholder).long() * (2 if modality == "video" else 1)
    out.update(extra)
    return replicate(out, batch)


def replicate(inputs: dict, batch: int) -> dict:
    """`inputs` of one prompt repeated `batch` times (pixel tensors and grids concatenated per sample)."""
    if batch == 1:
        return inputs
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = value.repeat(batch, *([1] * (value.dim() - 1)))
        elif key == "batch_num_images":
            out[key] = value.repeat(batch)
        else:  # per-item tensors: concatenated along the item axis
            out[key] = torch.cat([value] * batch)
    return out
