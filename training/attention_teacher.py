"""Attention supervision while training the bundled tiny models (training only; not part of the shipped model).

From scratch, a small VLM spends most of its CPU budget on a plateau: each question's answer position must find,
among 144+ visual tokens, the few cells of the object the question names, and the gradient towards any one
token is diluted by the uniform initial attention. We know those cells exactly (the scene is synthetic), so one
head of one decoder layer is taught to put its attention mass there: loss = -log(sum of the head's attention
probabilities over the asked object's cells) at the token that predicts each answer. The other heads and layers
are free. A side effect the project wants: the trained model's attention points at what the question is about,
which is what attention-based token-compression policies rely on.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def attention_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states [B, S, D] (after the layer's input norm) a forward pre-hook on a decoder layer's
    `self_attn` receives, whether passed by keyword or by position."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class AttentionTeacher:
    """Captures the inputs of `layer`'s attention and scores head `head` against target key positions."""

    def __init__(self, model, layer: int, head: int = 0) -> None:
        self.layer, self.head = layer, head
        attention = model.model.language_model.layers[layer].self_attn
        self.attention = attention
        self.captured: tuple | None = None
        self.handle = attention.register_forward_pre_hook(partial(AttentionTeacher._capture, self), with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.captured = (attention_input(args, kwargs), kwargs["position_embeddings"])

    def loss(self, query: torch.Tensor, targets: torch.Tensor, attended: torch.Tensor | None = None) -> torch.Tensor:
        """query [M, 2] (sample, position) rows; targets [M, S] bool key positions that should get the mass;
        attended [B, S] bool: keys the forward's attention mask lets through (None: all, causally)."""
        hidden, (cos, sin) = self.captured
        a = self.attention
        head_dim = a.head_dim
        groups = a.config.num_attention_heads // a.config.num_key_value_heads
        q = a.q_proj(hidden).view(*hidden.shape[:2], -1, head_dim)[:, :, self.head].unsqueeze(1)  # [B, 1, S, hd]
        k = a.k_proj(hidden).view(*hidden.shape[:2], -1, head_dim)[:, :, self.head // groups].unsqueeze(1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        b, pos = query[:, 0], query[:, 1]
        scores = torch.einsum("md,msd->ms", q[b, 0, pos], k[b, 0]) * head_dim**-0.5  # [M, S]
        keys = torch.arange(k.shape[2], device=k.device)
        scores = scores.masked_fill(keys[None, :] > pos[:, None], float("-inf"))  # causal
        if attended is not None:
            scores = scores.masked_fill(~attended[b], float("-inf"))
        logp = torch.log_softmax(scores.float(), dim=-1)
        return -torch.logsumexp(logp.masked_fill(~targets, float("-inf")), dim=-1).mean()

    def remove(self) -> None:
        self.handle.remove()
