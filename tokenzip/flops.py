"""Analytic FLOPs of a (compressed) VLM forward, component by component.

Conventions (identical to `torch.utils.flop_counter.FlopCounterMode`, which the tests check against):
a matrix product of [M, K] x [K, N] costs 2 M K N; convolutions likewise; attention costs the full
(non-causal) query x key product twice (scores and weighted values): 4 L_q L_k H d_head per layer; norms,
activations, softmax, RoPE and embedding lookups are not counted.

Per component, for a decoder layer processing L tokens with hidden D, H query / KV key-value heads of size
d_head and MLP width F (gated: 3 matrices):

    projections  2 L D (H + 2 KV) d_head + 2 L H d_head D
    MLP          3 * 2 L D F
    attention    4 L L_k H d_head          (prefill: L_k = L; decode: L = 1, L_k = cache length + 1)

ViT layers (CLIP, SigLIP) use 4 square projections and a 2-matrix MLP over T tokens per row (T = 577 with
CLS for CLIP-336, 729 for SigLIP-384) and run in full even when only layer -2 is used; Qwen2.5-VL's vision
blocks use fused qkv, a gated MLP and attention within windows (or within each image / temporal slice in the
full-attention blocks), followed by the 2x2 patch merger; Qwen2-VL's and Qwen3-VL's attend over whole slices with a
2-matrix MLP, and Qwen3-VL adds one merger per DeepStack layer. The LLaVA projector is two linears on each token.
`lm_head` costs 2 D V per position it is applied to (generate applies it to the last token only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DecoderDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, text) -> DecoderDims:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            text.hidden_size,
            text.num_attention_heads,
            text.num_key_value_heads or text.num_attention_heads,
            head_dim,
            text.intermediate_size,
            text.num_hidden_layers,
            text.vocab_size,
        )

    def layer_prefill(self, tokens: int, keys: int | None = None) -> int:
        """One decoder layer over `tokens` queries attending to `keys` keys (default: the same tokens)."""
        keys = tokens if keys is None else keys
        d, h, kv, hd, f = self.hidden, self.heads, self.kv_heads, self.head_dim, self.mlp
        proj = 2 * tokens * d * (h + 2 * kv) * hd + 2 * tokens * h * hd * d
        return proj + 6 * tokens * d * f + 4 * tokens * keys * h * hd

    def lm_head(self, tokens: int = 1) -> int:
        return 2 * tokens * self.hidden * self.vocab


@dataclass(frozen=True)
class VisionDims:
    kind: str  # "vit" (CLIP / SigLIP) or "qwen"
    hidden: int
    mlp: int
    layers: int
    patch: int
    image_size: int = 0
    has_cls: bool = False
    temporal_patch: int = 1
    merge: int = 1
    window_size: int = 0
    full_attention: tuple[int, ...] = ()
    out_hidden: int = 0
    gated_mlp: bool = True  # Qwen2.5-VL's SwiGLU blocks; Qwen2-VL's and Qwen3-VL's are fc1 -> GELU -> fc2
    extra_mergers: int = 0  # Qwen3-VL's DeepStack mergers (each as costly as the final merger)

    @classmethod
    def from_config(cls, config) -> VisionDims:
        v = config.vision_config
        if hasattr(v, "embed_dim"):  # Qwen2-VL: every block attends over a whole image / temporal slice
            return cls(
                "qwen", v.embed_dim, v.embed_dim * v.mlp_ratio, v.depth, v.patch_size,
                temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size,
                full_attention=tuple(range(v.depth)), out_hidden=v.hidden_size, gated_mlp=False,
            )  # fmt: skip
        if hasattr(v, "deepstack_visual_indexes"):  # Qwen3-VL: full attention, one merger per DeepStack layer
            return cls(
                "qwen", v.hidden_size, v.intermediate_size, v.depth, v.patch_size,
                temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size,
                full_attention=tuple(range(v.depth)), out_hidden=v.out_hidden_size, gated_mlp=False,
                extra_mergers=len(v.deepstack_visual_indexes),
            )  # fmt: skip
        if hasattr(v, "depth"):  # Qwen2.5-VL
            return cls(
                "qwen", v.hidden_size, v.intermediate_size, v.depth, v.patch_size,
                temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size, window_size=v.window_size,
                full_attention=tuple(v.fullatt_block_indexes), out_hidden=v.out_hidden_size,
            )  # fmt: skip
        return cls(
            "vit", v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.patch_size,
            image_size=v.image_size, has_cls=getattr(v, "model_type", "") == "clip_vision_model",
        )  # fmt: skip

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def vit_layer(self, rows: int, tokens: int) -> int:
        d = self.hidden
        return rows * (8 * tokens * d * d + 4 * tokens * d * self.mlp + 4 * tokens * tokens * d)

    def vit_tower(self, rows: int, tokens_per_layer: list[int] | None = None) -> int:
        """Patch embedding + every layer, `rows` images / tiles / frames (token widths per layer if pruned)."""
        n_patches = self.grid**2
        embed = 2 * rows * n_patches * self.hidden * 3 * self.patch**2
        widths = tokens_per_layer or [n_patches + int(self.has_cls)] * self.layers
        return embed + sum(self.vit_layer(rows, w) for w in widths)

    def qwen_tower(self, grids: list[tuple[int, int, int]]) -> int:
        """Patch embedding, blocks (windowed / full attention) and merger(s) for Qwen2.5-VL / Qwen2-VL / Qwen3-VL items
        (t, h, w). Qwen3-VL's learned position embeddings are a weighted sum of table rows (not counted)."""
        from transformers.vision_utils import get_vision_window_index

        d, f = self.hidden, self.mlp
        n = sum(t * h * w for t, h, w in grids)
        total = 2 * n * d * 3 * self.temporal_patch * self.patch**2
        mlp = (6 if self.gated_mlp else 4) * n * d * f  # gate + up + down, or fc1 + fc2
        dense = 2 * n * d * 3 * d + 2 * n * d * d + mlp  # qkv, proj, MLP
        slices = [h * w for t, h, w in grids for _ in range(t)]
        windows = slices
        if self.window_size:
            _, cu_window = get_vision_window_index(torch.tensor(grids), self.merge, self.window_size, self.patch)
            windows = (cu_window[1:] - cu_window[:-1]).tolist()
        for layer in range(self.layers):
            segments = slices if layer in self.full_attention else windows
            total += dense + sum(4 * s * s * d for s in segments)
        unit = self.merge**2
        merged = n // unit
        merger = 2 * merged * (d * unit) * (d * unit) + 2 * merged * (d * unit) * self.out_hidden
        return total + merger * (1 + self.extra_mergers)


def projector_flops(config, tokens: int) -> int:
    """LLaVA / OneVision projector (two linears) over `tokens` feature tokens. Qwen's merger is in the tower."""
    v = config.vision_config
    layers = getattr(config, "vision_feature_layer", -1)
    width = v.hidden_size * (len(layers) if isinstance(layers, list) else 1)
    d = config.get_text_config().hidden_size
    return 2 * tokens * width * d + 2 * tokens * d * d


@dataclass
class FlopsBreakdown:
    """FLOPs of one prefill (and one decode step), by component."""

    vision: int = 0
    projector: int = 0
    llm: int = 0
    lm_head: int = 0
    overhead: int = 0  # the policy's own scoring (attention recomputations), separate from the model
    decode_step: int = 0
    llm_per_layer: list[int] = field(default_factory=list)

    @property
    def prefill(self) -> int:
        """Model FLOPs of the prefill (vision + projector + LLM + lm_head), the policy's overhead excluded."""
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def total(self) -> int:
        return self.prefill + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {
            "vision": self.vision,
            "projector": self.projector,
            "llm": self.llm,
            "lm_head": self.lm_head,
            "prefill": self.prefill,
            "overhead": self.overhead,
            "total": self.total,
            "decode_step": self.decode_step,
        }


def llm_flops(dims: DecoderDims, lengths: list[int], batch: int = 1) -> list[int]:
    """Per decoder layer prefill FLOPs for the given processed lengths (padded widths when batched)."""
    return [batch * dims.layer_prefill(n) for n in lengths]


def decode_step_flops(dims: DecoderDims, cache_lengths: list[int], batch: int = 1) -> int:
    """One generated token: every layer attends to its own cache (+ the new token), then lm_head."""
    return batch * (sum(dims.layer_prefill(1, c + 1) for c in cache_lengths) + dims.lm_head(1))


def breakdown(
    config,
    lengths: list[int],
    *,
    vision_rows: int = 0,
    vision_widths: list[int] | None = None,
    qwen_grids: list[tuple[int, int, int]] | None = None,
    projector_tokens: int = 0,
    lm_head_tokens: int = 1,
    cache_lengths: list[int] | None = None,
    batch: int = 1,
    overhead: int = 0,
) -> FlopsBreakdown:
    """Assemble a breakdown from what each component processed.

    lengths: tokens each decoder layer processed in prefill (per sample; padded width when batch > 1);
    vision_rows / vision_widths: ViT rows and per-layer token width (None = unpruned); qwen_grids: Qwen2.5-VL
    (t, h, w) patch grids; projector_tokens: tokens through the LLaVA / OneVision projector; cache_lengths:
    KV entries per layer after prefill (default = lengths).
    """
    dims = DecoderDims.from_config(config.get_text_config())
    vdims = VisionDims.from_config(config)
    if vdims.kind == "qwen":
        vision = vdims.qwen_tower(qwen_grids) if qwen_grids else 0
    else:
        vision = vdims.vit_tower(vision_rows, vision_widths) if vision_rows else 0
    per_layer = llm_flops(dims, lengths, batch)
    return FlopsBreakdown(
        vision=vision,
        projector=projector_flops(config, projector_tokens) if vdims.kind == "vit" else 0,
        llm=sum(per_layer),
        lm_head=batch * dims.lm_head(lm_head_tokens),
        overhead=overhead,
        decode_step=decode_step_flops(dims, cache_lengths if cache_lengths is not None else lengths, batch),
        llm_per_layer=per_layer,
    )


def breakdown_of_record(config, record, lm_head_tokens: int = 1, overhead: int = 0) -> FlopsBreakdown:
    """Analytic FLOPs of one recorded prefill (`patch.stats.last`): what every component really processed.

    Uses the padded widths each decoder layer processed and each layer's KV width after prefill (batch
    included), and the vision workload of every feature call. `lm_head_tokens`: positions per sample the
    lm_head ran on (1 in generate, the full width in a plain forward).
    """
    batch = len(record.samples)
    vdims = VisionDims.from_config(config)
    vision = 0
    projector = 0
    for call in record.vision:
        if "qwen_grids" in call:
            vision += vdims.qwen_tower(call["qwen_grids"])
        else:
            vision += vdims.vit_tower(call["vision_rows"], call["vision_widths"])
            projector += projector_flops(config, call["projector_tokens"])
    dims = DecoderDims.from_config(config.get_text_config())
    per_layer = llm_flops(dims, record.width_per_layer, batch)
    return FlopsBreakdown(
        vision=vision,
        projector=projector,
        llm=sum(per_layer),
        lm_head=batch * dims.lm_head(lm_head_tokens),
        overhead=overhead,
        decode_step=decode_step_flops(dims, record.cache_width_per_layer, batch),
        llm_per_layer=per_layer,
    )


def sample_flops(config, record, prompt_lengths: list[int], lm_head_tokens: int = 1) -> list[dict[str, float]]:
    """Per-sample prefill FLOPs of a recorded forward, as run and unpruned (for per-sample logs).

    The LLM part is exact per sample: the real (unpadded) tokens each decoder layer processed, against
    `prompt_lengths[b]` tokens in every layer for the unpatched model (the prompt as the processor built it).
    The vision tower and projector ran as one batch, so each sample gets an equal share of that work; their
    unpruned counterparts use full token widths. Returns dicts with `prefill`, `prefill_unpruned`, `llm`,
    `llm_unpruned` and `ratio` (= prefill / prefill_unpruned).
    """
    batch = len(record.samples)
    if len(prompt_lengths) != batch:
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for a record of {batch} samples")
    vdims = VisionDims.from_config(config)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    per_row_full = vdims.grid**2 + int(vdims.has_cls and strategy == "full")
    vision = vision_full = 0
    for call in record.vision:
        if "qwen_grids" in call:
            tower = vdims.qwen_tower(call["qwen_grids"])
            vision, vision_full = vision + tower, vision_full + tower
        else:
            rows = call["vision_rows"]
            vision += vdims.vit_tower(rows, call["vision_widths"]) + projector_flops(config, call["projector_tokens"])
            vision_full += vdims.vit_tower(rows) + projector_flops(config, rows * per_row_full)
    dims = DecoderDims.from_config(config.get_text_config())
    head = dims.lm_head(lm_head_tokens)
    out = []
    for s, length in zip(record.samples, prompt_lengths):
        llm = sum(llm_flops(dims, s.sequence_per_layer))
        llm_full = sum(llm_flops(dims, [length] * dims.layers))
        prefill = vision / batch + llm + head
        prefill_full = vision_full / batch + llm_full + head
        out.append(
            {
                "prefill": prefill,
                "prefill_unpruned": prefill_full,
                "llm": llm,
                "llm_unpruned": llm_full,
                "ratio": prefill / prefill_full,
            }
        )
    return out
