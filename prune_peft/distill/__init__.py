"""Self-data distillation for recovering pruned models (Thangarasa et al., MLSys 2025, arXiv 2410.09982).

- :func:`drop_layers`: remove the ``n`` contiguous decoder blocks with the smallest angular distance
  (Gromov et al., 2024) and rewrite the config.
- :func:`self_distill`: the unpruned teacher rewrites every response (SDFT templates), filtered, cached, resumable.
- :class:`LogitDistillation`: optional KL-to-teacher loss for ``Trainer`` / ``SFTTrainer`` via ``compute_loss_func``.
- :func:`slerp_models`: SLERP merge of students fine-tuned on different distilled sets.
"""

from .generation import generate_texts
from .kd import LogitDistillation, TeacherTopK, kd_loss, precompute_teacher_topk
from .layer_drop import LayerDropReport, angular_distance, block_distances, drop_layers, remove_blocks
from .merge import slerp, slerp_models, slerp_state_dicts
from .self_distill import TEMPLATES, DistillTemplate, build_prompt, distill_stats, self_distill

__all__ = [
    "TEMPLATES",
    "DistillTemplate",
    "LayerDropReport",
    "LogitDistillation",
    "TeacherTopK",
    "angular_distance",
    "block_distances",
    "build_prompt",
    "distill_stats",
    "drop_layers",
    "generate_texts",
    "kd_loss",
    "precompute_teacher_topk",
    "remove_blocks",
    "self_distill",
    "slerp",
    "slerp_models",
    "slerp_state_dicts",
]
