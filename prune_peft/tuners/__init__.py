"""PEFT adapter types that preserve a pruned base's sparsity; :func:`register_adapter_types` registers them with peft.

``SPARSE_LORA`` (SQFT SparsePEFT, ``ΔW = M ⊙ s·B A``) and ``SPP`` (``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``) are
peft ``LoraConfig``/``LoraModel`` subclasses: ``get_peft_model``, ``PeftModel.from_pretrained``, ``save_pretrained``,
``merge_and_unload`` and the rest of peft's API work unchanged after ``import prune_peft`` (whose ``__init__`` calls
:func:`register_adapter_types`; importing a tuner folder registers nothing by itself).
"""

from ..sparsity.packing import pack_mask, unpack_mask
from ._base import SparseAdapterLayer, dense_weight, set_sparse_masks, sparse_layers
from ._buffers import AdapterBuffers, PackedMasks
from ._registry import ensure_peft_type, register_adapter_type
from .loraprune import LoRAPruneConfig, LoRAPruneModel
from .sparse_lora import SparseLoraConfig, SparseLoraModel
from .spp import SPPConfig, SPPModel

# (name, config class, tuner class): the adapter types prune_peft adds to peft, all with peft's LoRA key prefix
ADAPTER_TYPES = (
    ("sparse_lora", SparseLoraConfig, SparseLoraModel),
    ("spp", SPPConfig, SPPModel),
    ("loraprune", LoRAPruneConfig, LoRAPruneModel),
)


def register_adapter_types() -> None:
    """Register SPARSE_LORA, SPP and LORAPRUNE with peft (idempotent); ``import prune_peft`` calls it."""
    for name, config_cls, model_cls in ADAPTER_TYPES:
        register_adapter_type(name, config_cls, model_cls, prefix="lora_")


__all__ = [
    "ADAPTER_TYPES",
    "AdapterBuffers",
    "LoRAPruneConfig",
    "LoRAPruneModel",
    "PackedMasks",
    "SPPConfig",
    "SPPModel",
    "SparseAdapterLayer",
    "SparseLoraConfig",
    "SparseLoraModel",
    "dense_weight",
    "ensure_peft_type",
    "pack_mask",
    "register_adapter_type",
    "register_adapter_types",
    "set_sparse_masks",
    "sparse_layers",
    "unpack_mask",
]
