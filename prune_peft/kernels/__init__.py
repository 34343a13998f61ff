"""2:4 semi-structured sparsity on GPUs: Triton mask/compress kernels and a frozen 2:4 base on sparse tensor cores.

``enable_semi_structured(model)`` replaces every 2:4 ``nn.Linear`` (including frozen bases under peft LoRA or
SparseLoRA) by a :class:`SemiStructuredLinear` holding the same parameters, which runs on PyTorch's
cuSPARSELt/CUTLASS kernels on sm80+ GPUs in fp16/bf16, and the exact dense path elsewhere (one warning).
Triton is imported only when a Triton kernel runs. Docs: docs/kernels.md.

Import direction: ``kernels`` depends on ``sparsity`` (pure tensor math) only; the adapter layers in ``tuners`` call
into ``kernels`` (:func:`~prune_peft.kernels.adapters.masked_lora_24`), never the other way round.
"""

from .semi_structured import (
    SemiStructuredFallbackWarning,
    SemiStructuredLinear,
    choose_backend,
    disable_semi_structured,
    enable_semi_structured,
    semi_structured_status,
)
from .sparse24 import compress24, mask24, prune24, transposable_mask24

__all__ = [
    "SemiStructuredFallbackWarning",
    "SemiStructuredLinear",
    "choose_backend",
    "compress24",
    "disable_semi_structured",
    "enable_semi_structured",
    "mask24",
    "prune24",
    "semi_structured_status",
    "transposable_mask24",
]
