"""Nominal schedules: the tokens a policy lets through per decoder layer, predicted from geometry alone.

`tokenzip flops` uses them to price a policy on a real model without weights or inputs. They are exact for
the deterministic parts of each schedule; data-dependent parts assume the neutral case and say so in the
policy's `nominal` docstring (no MustDrop window merges, no HoliTom static tokens, every grid row keeps a
token where a newline rule depends on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..items import ItemShape


@dataclass
class Nominal:
    """One item's tokens (visual + structural) per decoder layer in prefill, and KV entries per layer after it.

    vision_widths: per ViT layer token width of each row when the policy prunes inside the tower (else None).
    """

    tokens: list[int]
    cache: list[int] | None = None
    vision_widths: list[int] | None = None

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = list(self.tokens)


def structural(shape: ItemShape, newlines: str) -> int:
    """Structural tokens kept: all ('keep', and 'keep_nonempty_rows' assuming every row keeps a token) or
    only the leading / trailing ones ('drop')."""
    if newlines in ("keep", "keep_nonempty_rows"):
        return shape.length - shape.n_content
    return shape.leading + shape.trailing


def staged(first: int, counts: list[int], stage_layers: tuple[int, ...], n_layers: int, extra: int) -> list[int]:
    """Per layer: `first` tokens before the first stage layer, counts[i] from stage_layers[i] on (+ extra)."""
    out, current, stage = [], first, 0
    for layer in range(n_layers):
        while stage < len(stage_layers) and layer >= stage_layers[stage]:
            current = counts[stage]
            stage += 1
        out.append(current + extra)
    return out
