"""Pure tensor code for sparsity (torch only, no Hugging Face imports).

Submodules: ``masks`` (unstructured / N:M / group masks, validators), ``criteria`` (magnitude, Wanda), ``sparsegpt``,
``schedules``, ``loraprune`` (LoRA-guided importance), ``adapters`` (SparsePEFT / SPP updates and their autograd),
``packing`` (bit-packed masks), ``sste`` (S-STE 2:4 projection), ``qtuning`` (Q-Tuning selection math).
"""

from .criteria import InputStats, magnitude_scores, wanda_scores
from .masks import (
    NMPattern,
    global_masks,
    gqa_unit_scores,
    group_mask,
    is_nm_sparse,
    nm_mask,
    nm_violations,
    parse_pattern,
    unstructured_mask,
    validate_sparsity,
)
from .schedules import cubic_schedule, linear_schedule, sparsity_at
from .sparsegpt import sparsegpt_prune

__all__ = [
    "InputStats",
    "NMPattern",
    "cubic_schedule",
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
    "sparsity_at",
    "unstructured_mask",
    "validate_sparsity",
    "wanda_scores",
]
