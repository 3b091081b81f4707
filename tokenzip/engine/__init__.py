"""The hook runtime that drives policies on a model: layouts, masks, stages, statistics."""
