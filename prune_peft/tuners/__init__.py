"""PEFT adapter types that preserve a pruned base's sparsity, registered with peft on import.

``SPARSE_LORA`` (SQFT SparsePEFT, ``ΔW = M ⊙ s·B A``) and ``SPP`` (``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``) are
peft ``LoraConfig``/``LoraModel`` subclasses: ``get_peft_model``, ``PeftModel.from_pretrained``, ``save_pretrained``,
``merge_and_unload`` and the rest of peft's API work unchanged after ``import prune_peft``.
"""

from ..hub import install_push_to_hub_card as _install_card_hook
from ._base import SparseAdapterLayer, dense_weight, set_sparse_masks, sparse_layers
from ._masks import AdapterBuffers, PackedMasks, pack_mask, unpack_mask
from ._registry import ensure_peft_type, register_adapter_type
from .loraprune import LoRAPruneConfig, LoRAPruneModel  # registers LORAPRUNE
from .sparse_lora import SparseLoraConfig, SparseLoraModel
from .spp import SPPConfig, SPPModel

_install_card_hook()

__all__ = [
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
    "set_sparse_masks",
    "sparse_layers",
    "unpack_mask",
]
