"""SparseLoRA: SQFT's sparsity-preserving LoRA, ``ΔW = M ⊙ s·B A``, as a peft adapter type (``SPARSE_LORA``)."""

from .._registry import register_adapter_type
from .config import SparseLoraConfig
from .layer import SparseLoraLinear
from .model import SparseLoraModel

__all__ = ["SparseLoraConfig", "SparseLoraLinear", "SparseLoraModel"]

register_adapter_type("sparse_lora", SparseLoraConfig, SparseLoraModel, prefix="lora_")
