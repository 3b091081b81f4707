"""The statistics of one prefill (`patch.stats`): per item what it kept, per layer what each sample processed."""

from __future__ import annotations

import torch

from ..budget import item_budget
from .config import PatchConfig
from .layout import Layout
from .state import ForwardRecord, ForwardState, ItemRecord, SampleRecord


def changed_layouts(layouts: list[Layout], counts: list[int]) -> list[tuple[str, Layout]]:
    """('LLM input', layer-0 layout), then ('layer k', layout) for every layer whose visual count (one sample's
    `counts`, per layer) is below the previous layer's: the stages at which that sample's visual tokens changed."""
    out = [("LLM input", layouts[0])]
    out += [(f"layer {k}", layouts[k]) for k in range(1, len(layouts)) if counts[k] < counts[k - 1]]
    return out


def forward_record(cfg: PatchConfig, st: ForwardState, processed: list[Layout]) -> ForwardRecord:
    """The record of a finished prefill; `processed`: the layout each decoder layer ran on."""
    layouts = processed or [st.layout0]
    budget_keep = 1.0 if cfg.policy.name == "none" else cfg.keep  # `none` is asked to keep everything
    prompt_mask = st.attention_mask
    if isinstance(prompt_mask, torch.Tensor) and prompt_mask.dim() == 2:
        prompt_tokens = prompt_mask.bool().sum(1).tolist()
    else:
        prompt_tokens = [st.orig_len] * len(st.items.per_sample)
    vis = torch.stack([lay.visual_counts() for lay in layouts], 1).tolist()
    seq = torch.stack([lay.valid.sum(1) for lay in layouts], 1).tolist()
    cached = torch.stack([lay.valid.sum(1) for lay in (st.layer_layouts or layouts)], 1).tolist()
    samples = []
    for b, items in enumerate(st.items.per_sample):
        records = []
        for j, it in enumerate(items):
            blank = (torch.arange(it.length), 0, None, None)
            kept_idx, padded, groups, vision_left = st.item_kept[b][j] if st.item_kept else blank
            content = it.shape.content_mask()
            n_content = int(content[kept_idx[kept_idx >= 0]].sum())
            record = ItemRecord(it.modality, it.length, it.shape.n_content, n_content, kept_idx, padded)
            record.shape, record.groups = it.shape, groups
            if vision_left is not None:
                record.stages.append(("vision", vision_left[content[vision_left]]))
            records.append(record)
        for name, lay in changed_layouts(layouts, vis[b]):
            for j, it in enumerate(items):
                mask = lay.valid[b] & lay.visual[b] & (lay.item[b] == j)
                local = (lay.orig[b][mask] - it.start).cpu()
                records[j].stages.append((name, local[local >= 0]))
        budget = sum(item_budget(budget_keep, it.shape.n_content) for it in items)
        samples.append(SampleRecord(records, vis[b], seq[b], cached[b], budget, int(prompt_tokens[b])))
    record = ForwardRecord(cfg.policy.name, cfg.keep, samples, dict(st.seconds), list(dict.fromkeys(st.notes)))
    record.config = cfg.model.config
    record.width_per_layer = [lay.length for lay in layouts]
    record.cache_width_per_layer = [lay.length for lay in (st.layer_layouts or layouts)]
    record.vision = [c.workload for c in st.calls if c.workload is not None]
    return record
