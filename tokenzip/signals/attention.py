"""Attention scores recomputed from an attention module's own inputs, without eager attention.

Models run with sdpa / FlashAttention return no attention weights. Policies need only a few rows of them
(the CLS row, the last text token's row) or per-key means over queries, so these functions recompute
exactly those from the captured (normed) input of the attention module, calling the module's own
projections (never reading `.weight`, which is on the meta device under accelerate offload). All results are
head-averaged post-softmax probabilities, the quantity eager attention would return, restricted to what was asked
for.

`score_dtype` (the policies' option of that name): "float32" (default) takes the logits to float32 and runs
softmax and every average in float32. "model" reproduces the numerics of the official code, which scores in the
model's dtype (fp16 / bf16 eager attention): logits rounded to the model dtype, softmax computed in float32 and
rounded to the model dtype (as eager attention returns its weights; a native half-precision softmax differs by at
most one unit in the last place), the mean over heads rounded to the model dtype, the mean over queries
accumulated in float32 and rounded to the model dtype once. Such scores are returned as float32 tensors holding
model-dtype values, so the exact ties that half-precision averaging creates (and the official top-k meets)
survive. For a float32 model both modes agree.

Masks: `keep` masks here are bool, True = may attend, broadcastable to [B, 1, Q, K]; `as_keep_mask`
converts the formats transformers passes to layers (None, bool 4-D for sdpa, additive float 4-D for
eager, 2-D padding masks for FlashAttention).
"""

from __future__ import annotations

import itertools

import torch


def as_keep_mask(mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """A bool keep-mask [B, 1, Q, K] (or None) from any attention-mask format transformers uses."""
    if mask is None:
        return None
    if mask.dim() == 2:  # FlashAttention padding mask [B, K]: 1 = real token
        return mask.bool()[:, None, None, :].expand(-1, 1, q_len, -1)
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama/Qwen2/Qwen2.5-VL decoders apply it: x [B, H, L, hd], cos/sin [B, L, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


SCORE_DTYPES = ("float32", "model")


def check_score_dtype(score_dtype: str) -> None:
    """ValueError unless `score_dtype` is one of SCORE_DTYPES."""
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype={score_dtype!r}; choose one of {list(SCORE_DTYPES)}")


def _round(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """float32 `x` rounded to `dtype` (None: unchanged), returned as float32."""
    return x if dtype is None else x.to(dtype).float()


def _model_dtype(x: torch.Tensor, score_dtype: str) -> torch.dtype | None:
    """The dtype scores are rounded to: None for "float32" (and for any model in float32 or wider)."""
    check_score_dtype(score_dtype)
    if score_dtype == "float32" or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    return x.dtype


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
    """q k^T * scale as float32 [.., R, K]; with a model `dtype` computed and rounded in that dtype."""
    if dtype is None:
        return (q @ k.transpose(-1, -2)).float() * scale
    return ((q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale).float()


def _softmax_mean_heads(scores: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax over the last dim in float32, then mean over heads (dim 1). Rows that are fully masked give 0.
    With a model `dtype` the probabilities and the head mean are rounded to it (see the module docstring)."""
    probs = _round(torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0), dtype)
    return _round(probs.mean(1), dtype)


def _project(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for x [B, R, D]; with R = 0 (keys-only calls) an empty [B, 0, out] without running the layer:
    bitsandbytes' CPU 4-bit kernel crashes the process (division by zero) on an empty input."""
    if x.shape[1]:
        return linear(x)
    weight = getattr(linear, "weight", None)
    out = getattr(linear, "out_features", None) or weight.shape[0]
    return x.new_zeros(x.shape[0], 0, out)


# ------------------------------------------------------------------------------------------ ViT encoders
def encoder_qk(attn: torch.nn.Module, hidden_states: torch.Tensor, rows: torch.Tensor | slice | None = None):
    """Queries (of `rows`, all rows if None) and keys [B, H, *, hd] of a CLIP / SigLIP attention module."""
    b, n, _ = hidden_states.shape
    hd = attn.head_dim
    q_in = hidden_states if rows is None else hidden_states[:, rows]
    q = _project(attn.q_proj, q_in).view(b, q_in.shape[1], attn.num_heads, hd).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(b, n, attn.num_heads, hd).transpose(1, 2)
    return q, k


def encoder_attention_rows(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    rows: torch.Tensor | slice,
    attention_mask: torch.Tensor | None = None,
    score_dtype: str = "float32",
) -> torch.Tensor:
    """Head-mean attention probabilities of the query `rows` of a CLIP / SigLIP layer.

    hidden_states: the attention module's input (after `layer_norm1`), [B, N, D].
    Returns float32 [B, R, N]. For the CLS row of CLIP use rows=slice(0, 1). `score_dtype`: see the module.
    """
    dtype = _model_dtype(hidden_states, score_dtype)
    q, k = encoder_qk(attn, hidden_states, rows)
    scores = _logits(q, k, attn.scale, dtype)
    keep = as_keep_mask(attention_mask, hidden_states.shape[1], hidden_states.shape[1])
    if keep is not None:
        scores = scores.masked_fill(~keep[:, :, rows], float("-inf"))
    return _softmax_mean_heads(scores, dtype)


def encoder_attention_received(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 256,
    score_dtype: str = "float32",
) -> torch.Tensor:
    """Mean attention each key receives, over heads and over all real queries, of a CLIP / SigLIP layer.

    `attention_mask` may mark padding keys (as tokenzip's vision stage does); padding tokens then neither count
    as queries nor receive attention. Queries are processed in chunks of `chunk` rows, so memory stays
    O(chunk * N * H). `score_dtype`: see the module.
    hidden_states: [B, N, D]. Returns float32 [B, N].
    """
    dtype = _model_dtype(hidden_states, score_dtype)
    b, n, _ = hidden_states.shape
    keep = as_keep_mask(attention_mask, n, n)
    # a token is real iff every query may attend to it (bidirectional encoder; padding is a key mask)
    real = keep.all(dim=-2)[:, 0].float() if keep is not None else torch.ones(b, n, device=hidden_states.device)
    _, k = encoder_qk(attn, hidden_states, slice(0, 0))
    total = torch.zeros(b, n, dtype=torch.float32, device=hidden_states.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        q = (
            attn.q_proj(hidden_states[:, rows])
            .view(b, rows.stop - start, attn.num_heads, attn.head_dim)
            .transpose(1, 2)
        )
        scores = _logits(q, k, attn.scale, dtype)
        if keep is not None:
            scores = scores.masked_fill(~keep[:, :, rows], float("-inf"))
        probs = _softmax_mean_heads(scores, dtype)  # [B, R, N]
        total += (probs * real[:, rows, None]).sum(1)
    n_queries = real.sum(1, keepdim=True)
    return _round(total / n_queries.clamp_min(1.0), dtype)


def encoder_head_mean_keys(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Key vectors of a CLIP / SigLIP layer averaged over heads: [B, N, head_dim] (float32)."""
    b, n, _ = hidden_states.shape
    return attn.k_proj(hidden_states).view(b, n, attn.num_heads, attn.head_dim).float().mean(2)


# ------------------------------------------------------------------------------------------ Qwen2.5-VL vision
def qwen_vision_qk(attn: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings):
    """Post-RoPE queries and keys [H, N, hd] of a Qwen2.5-VL vision attention module (float32)."""
    n = hidden_states.shape[0]
    q, k, _ = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q, k = q.float(), k.float()
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    return q.transpose(0, 1), k.transpose(0, 1)


def qwen_vision_head_mean_keys(attn: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Key vectors of a Qwen2.5-VL vision block before its 2-D RoPE, averaged over heads: [N, head_dim]."""
    n = hidden_states.shape[0]
    k = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1)[:, 1]
    return k.float().mean(1)


def qwen_vision_attention_received(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 256,
    score_dtype: str = "float32",
) -> torch.Tensor:
    """Mean attention each token receives inside its own `cu_seqlens` segment (window or image slice).

    Exactly what the block computes: attention never crosses segment boundaries. Tokens are in the vision
    tower's window-permuted order. hidden_states: [N, D] (after `norm1`); returns float32 [N]. `score_dtype`:
    see the module ("model": the post-RoPE q / k rounded to the model dtype, as the block feeds them to its
    attention kernel).
    """
    dtype = _model_dtype(hidden_states, score_dtype)
    q, k = qwen_vision_qk(attn, hidden_states, position_embeddings)
    out = torch.zeros(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for s, e in itertools.pairwise(bounds):
        if e <= s:
            continue
        ks = k[:, s:e]
        acc = torch.zeros(e - s, dtype=torch.float32, device=hidden_states.device)
        for start in range(s, e, chunk):
            stop = min(e, start + chunk)
            scores = _logits(q[:, start:stop], ks, attn.scaling, dtype)
            acc += _softmax_mean_heads(scores[None], dtype)[0].sum(0)
        out[s:e] = _round(acc / (e - s), dtype)
    return out


# ------------------------------------------------------------------------------------------ LLM decoders
def _head_norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, hd] through the attention module's per-head RMS norm `name` (Qwen3's `q_norm` / `k_norm`,
    applied before RoPE); unchanged for decoders without one."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def decoder_qk(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries [B, H, R, hd] (of `rows`, all if None) and GQA-expanded keys [B, H, L, hd].

    Works for Llama, Qwen2, Qwen2.5-VL and Qwen3-VL decoder attention (the M-RoPE of the Qwen-VL models is already
    folded into the (cos, sin) [B, L, hd] that the model passes to each layer; Qwen3's q / k norms are applied).
    `keys`: post-RoPE keys [B, KV, L, hd] to reuse (e.g. the layer's cache entries) instead of recomputing them.
    """
    b, n, _ = hidden_states.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    if rows is None:
        q_in, q_cos, q_sin = hidden_states, cos, sin
    else:
        q_in, q_cos, q_sin = hidden_states[:, rows], cos[:, rows], sin[:, rows]
    n_heads = attn.config.num_attention_heads
    q = _head_norm(attn, "q_norm", _project(attn.q_proj, q_in).view(b, q_in.shape[1], n_heads, hd)).transpose(1, 2)
    q = _apply_rope(q, q_cos, q_sin)
    if keys is None:
        k = attn.k_proj(hidden_states).view(b, n, attn.config.num_key_value_heads, hd)
        k = _apply_rope(_head_norm(attn, "k_norm", k).transpose(1, 2), cos, sin)
    else:
        k = keys
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    return q, k


def decoder_head_mean_keys(
    attn: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Post-RoPE key vectors of a decoder layer averaged over its (KV) heads: [B, L, head_dim] (float32).

    With GQA every KV head serves the same number of query heads, so this equals the mean over query heads.
    """
    _, k = decoder_qk(attn, hidden_states, position_embeddings, torch.zeros(0, dtype=torch.long))
    return k.float().mean(1)


def decoder_key_l1(
    attn: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """L1 norm of each token's post-RoPE key over all KV heads of a decoder layer (heads concatenated): [B, L]
    float32. With GQA the keys are not repeated to the query heads; repeating them multiplies every norm by the
    same group size, so the ranking is the same."""
    b, n, _ = hidden_states.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    k = attn.k_proj(hidden_states).view(b, n, attn.config.num_key_value_heads, hd)
    k = _head_norm(attn, "k_norm", k).transpose(1, 2)  # Qwen3's per-head key norm, before RoPE
    return _apply_rope(k, cos, sin).float().abs().sum(dim=(1, 3))


def _decoder_keep(attention_mask, rows: torch.Tensor, n: int, device) -> torch.Tensor:
    """Causal (by sequence index) & padding keep-mask for query `rows` over `n` keys: [B or 1, 1, R, n]."""
    causal = torch.arange(n, device=device)[None, :] <= rows[:, None]
    keep = causal[None, None]
    full = as_keep_mask(attention_mask, n, n)
    if full is not None:
        keep = keep & full[:, :, rows, :n]
    return keep


def decoder_attention_rows(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    chunk: int = 256,
    score_dtype: str = "float32",
) -> torch.Tensor:
    """Head-mean attention probabilities of query `rows` of a decoder layer during prefill.

    hidden_states: the attention module's input (after `input_layernorm`), [B, L, D]; rows: LongTensor [R]
    (negative values count from the end, e.g. tensor([-1]) = the last token, FastV). The causal mask is by
    sequence index; `attention_mask` adds padding (any transformers format). Rows are processed in chunks of
    `chunk`, so peak memory is O(chunk * L * H). Returns float32 [B, R, L]. `score_dtype`: see the module.
    """
    dtype = _model_dtype(hidden_states, score_dtype)
    n = hidden_states.shape[1]
    rows = torch.as_tensor(rows, device=hidden_states.device).long() % n
    if keys is None:
        _, keys = decoder_qk(attn, hidden_states, position_embeddings, rows[:0])
    out = []
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        q, k = decoder_qk(attn, hidden_states, position_embeddings, part, keys)
        scores = _logits(q, k, attn.scaling, dtype)
        scores = scores.masked_fill(~_decoder_keep(attention_mask, part, n, scores.device), float("-inf"))
        out.append(_softmax_mean_heads(scores, dtype))
    if not out:
        return torch.zeros(hidden_states.shape[0], 0, n, device=hidden_states.device)
    return torch.cat(out, 1)


def decoder_attention_received(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 256,
    score_dtype: str = "float32",
) -> torch.Tensor:
    """Mean attention each key receives from the queries selected by `query_mask`, over heads, in prefill.

    query_mask: BoolTensor [B, L] (e.g. the visual tokens of each sample). Queries are processed in chunks of
    `chunk` rows; causal by sequence index plus `attention_mask` padding. Returns float32 [B, L] (the mean over
    each sample's selected queries; 0 for keys no selected query can see). `score_dtype`: see the module
    ("model" = the eager decoder's float32 softmax cast back to fp16 / bf16 before the averages, as the official
    VisionDrop scores).
    """
    dtype = _model_dtype(hidden_states, score_dtype)
    b, n, _ = hidden_states.shape
    _, k = decoder_qk(attn, hidden_states, position_embeddings, torch.zeros(0, dtype=torch.long), None)
    total = torch.zeros(b, n, dtype=torch.float32, device=hidden_states.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=hidden_states.device)
        sel = query_mask[:, rows].float()
        if not bool(sel.any()):
            continue
        q, _ = decoder_qk(attn, hidden_states, position_embeddings, rows, keys=k)
        scores = _logits(q, k, attn.scaling, dtype)
        scores = scores.masked_fill(~_decoder_keep(attention_mask, rows, n, scores.device), float("-inf"))
        probs = _softmax_mean_heads(scores, dtype)  # [B, R, L]
        total += (probs * sel[..., None]).sum(1)
    return _round(total / query_mask.float().sum(1, keepdim=True).clamp_min(1.0), dtype)
