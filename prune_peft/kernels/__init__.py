"""2:4 semi-structured sparsity on GPUs: Triton mask/compress kernels and a frozen 2:4 base on sparse tensor cores.

``enable_semi_structured(model)`` makes every 2:4 ``nn.Linear`` (including frozen bases under peft LoRA or
SparseLoRA) run on PyTorch's cuSPARSELt/CUTLASS kernels on sm80+ GPUs in fp16/bf16, and the exact dense path
elsewhere (one warning). Docs: docs/kernels.md.
"""

from .semi_structured import (
    SemiStructuredFallbackWarning,
    SemiStructuredLinear,
    choose_backend,
    disable_semi_structured,
    enable_semi_structured,
    semi_structured_status,
)
from .sparse24 import (
    compress24,
    decompress24,
    is_transposable24,
    mask24,
    prune24,
    transposable_mask24,
    triton_available,
)

__all__ = [
    "SemiStructuredFallbackWarning",
    "SemiStructuredLinear",
    "choose_backend",
    "compress24",
    "decompress24",
    "disable_semi_structured",
    "enable_semi_structured",
    "is_transposable24",
    "mask24",
    "prune24",
    "semi_structured_status",
    "transposable_mask24",
    "triton_available",
]
