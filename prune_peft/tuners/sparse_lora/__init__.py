"""SparseLoRA: SQFT's sparsity-preserving LoRA, ``ΔW = M ⊙ s·B A``, as a peft adapter type (``SPARSE_LORA``)."""

from .config import SparseLoraConfig
from .layer import SparseLoraLinear
from .model import SparseLoraModel

__all__ = ["SparseLoraConfig", "SparseLoraLinear", "SparseLoraModel"]
