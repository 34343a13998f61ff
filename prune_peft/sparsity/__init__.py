"""Pure tensor code for sparsity: masks, criteria, SparseGPT, schedules (no Hugging Face imports)."""

from .criteria import InputStats, magnitude_scores, wanda_scores
from .masks import (
    NMPattern,
    expand_group_mask,
    global_masks,
    gqa_unit_scores,
    group_mask,
    is_nm_sparse,
    nm_mask,
    nm_violations,
    parse_pattern,
    sparsity,
    unstructured_mask,
    validate_sparsity,
)
from .schedules import cubic_schedule, linear_schedule, sparsity_at
from .sparsegpt import sparsegpt_prune

__all__ = [
    "InputStats",
    "NMPattern",
    "cubic_schedule",
    "expand_group_mask",
    "global_masks",
    "gqa_unit_scores",
    "group_mask",
    "is_nm_sparse",
    "linear_schedule",
    "magnitude_scores",
    "nm_mask",
    "nm_violations",
    "parse_pattern",
    "sparsegpt_prune",
    "sparsity",
    "sparsity_at",
    "unstructured_mask",
    "validate_sparsity",
    "wanda_scores",
]
