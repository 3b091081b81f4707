"""Phrase-word classifiers on the query side of the noun hop (training only; discarded afterwards).

The noun head (`attention_teacher.py`) must match the words of a phrase ("red", "red square") against the visual
tokens of the object they describe, so its queries must tell the words apart. Measured on a OneVision run that
stalled at 76 %: at colour words the residual stream entering the noun layer had a norm of about 17 against 0.84
for the word's embedding (layer 0's MLP wrote most of it), and the noun head's mean query-key score was the same
for every colour word against cells of every colour (5.2-5.6), so purple, blue and red sent their mass to the
same cells; shape words, scored the same way, preferred their own shape by a wide margin. Two linear classifiers
read the noun layer's attention input (after its input norm: what the query projection sees) at the last word of
every naming phrase and predict the phrase's first and last word (the same word for a one-word phrase), which
keeps the words linearly separable where the query is formed.
"""

from __future__ import annotations

from functools import partial

import torch

from .attention_teacher import attention_input


def phrase_targets(turns, input_ids: torch.Tensor, noun_ids: set[int]) -> tuple[torch.Tensor, ...]:
    """From `train.named_turns` tuples and the batch's input ids [B, S]: (rows [P, 2] long (sample, position of the
    last word of a naming phrase), first-word ids [P] long, last-word ids [P] long). A phrase is one naming word
    or "colour shape", so its first word is the token before the last one when that token is a naming word."""
    rows = [(b, end) for b, _, _, ends, _ in turns for end in ends]
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, 2, dtype=torch.long), empty, empty
    rows_t = torch.tensor(rows, dtype=torch.long)
    last = input_ids[rows_t[:, 0], rows_t[:, 1]]
    before = input_ids[rows_t[:, 0], (rows_t[:, 1] - 1).clamp(min=0)]
    two_words = torch.isin(before, torch.tensor(sorted(noun_ids), dtype=torch.long)) & (rows_t[:, 1] > 0)
    return rows_t, torch.where(two_words, before, last), last


class PhraseProbes(torch.nn.Module):
    """Two linear classifiers over `words` token ids reading the input of decoder layer `layer`'s attention."""

    def __init__(self, model, layer: int, words: int) -> None:
        super().__init__()
        dim = model.config.get_text_config().hidden_size
        self.first = torch.nn.Linear(dim, words)
        self.last = torch.nn.Linear(dim, words)
        self.hidden: torch.Tensor | None = None  # [B, S, D] after the layer's input norm, on the last forward
        attention = model.model.language_model.layers[layer].self_attn
        self.handle = attention.register_forward_pre_hook(partial(PhraseProbes._capture, self), with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.hidden = attention_input(args, kwargs)

    def loss(self, rows: torch.Tensor, first_ids: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
        """Sum of the two cross-entropies (mean over the P rows) on the last forward; 0 without rows."""
        if not rows.numel():
            return torch.zeros(())
        read = self.hidden[rows[:, 0], rows[:, 1]].float()  # [P, D]
        ce = torch.nn.functional.cross_entropy
        return ce(self.first(read), first_ids) + ce(self.last(read), last_ids)

    def remove(self) -> None:
        self.handle.remove()
