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
    work = workload(model, images=images, image_size=image_size, frames=frames, text_tokens=text_tokens)
    g = torch.Generator().manual_seed(seed)
    text = _text_sampler(model.config, g)
    first = text(text_tokens // 2)  # drawn in prompt order: the item runs and pixels, then the rest of the text
    runs, extra = adapter.example_inputs(work.shapes, work.qwen_grids, images, image_size, frames, text, g)
    ids = torch.cat([first, *runs, text(text_tokens - text_tokens // 2)])[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out.update(adapter.token_types(ids, "video" if frames else "image"))
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
