"""Shared tensor maths used by policies (model-family agnostic)."""

from .gather import gather_rows, gather_seq
from .pool import pool_grid
from .topk import topk_keep_order, topk_stable

__all__ = ["gather_rows", "gather_seq", "pool_grid", "topk_keep_order", "topk_stable"]
