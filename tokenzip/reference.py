"""Reference computations for checking compressed generation.

`cached_greedy` runs `model.generate` (KV cache); `uncached_logits` recomputes every step from scratch: a fresh
prefill of prompt + generated prefix with `use_cache=False`, under the same patch, so the policy re-selects
on each call. Equal results prove that masks, positions and per-layer caches stay consistent in decoding.
"""

from __future__ import annotations

import torch


def _suppress(model) -> list[int]:
    cfg = model.config
    return [
        int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if i is not None
    ]


def cached_greedy(model, inputs: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` for exactly `steps` tokens. Returns (new tokens [B, steps], logits [B, steps, V])."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=_suppress(model),
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.logits, 1)


def _eos(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]


def greedy_tokens(model, logits: torch.Tensor) -> torch.Tensor:
    """argmax of `logits` [..., V] with the placeholder ids suppressed and, as `min_new_tokens` does in
    `cached_greedy`, the end-of-sequence ids too (every step of it is before its minimum length)."""
    masked = logits.clone()
    masked[..., _suppress(model) + _eos(model)] = float("-inf")
    return masked.argmax(-1)


def extend_inputs(model, inputs: dict, new_tokens: torch.Tensor) -> dict:
    """`inputs` with `new_tokens` [B, t] appended (mask, token types and explicit positions extended)."""
    ids = torch.cat([inputs["input_ids"], new_tokens.to(inputs["input_ids"].device)], 1)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
    out = dict(inputs, input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new_tokens)], 1)
    else:  # LLaVA / OneVision: positions as generate() builds them (left padding aware)
        out["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return out


def uncached_logits(model, inputs: dict, new_tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a cache-free forward after each prefix of `new_tokens`: [B, steps, V]."""
    steps = new_tokens.shape[1]
    rows = []
    with torch.no_grad():
        for t in range(steps):
            full = extend_inputs(model, inputs, new_tokens[:, :t])
            rows.append(model(**full, use_cache=False).logits[:, -1])
    return torch.stack(rows, 1)
