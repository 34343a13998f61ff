"""SparseLoRA on bitsandbytes bases (QLoRA style): importable only when bitsandbytes is installed.

As peft's ``peft.tuners.lora.bnb``, this module imports bitsandbytes at import time and defines its classes only for
the quantization kinds the installed bitsandbytes provides; :func:`~prune_peft.tuners.sparse_lora.layer.
layer_mapping_sparse_lora` imports it lazily, after peft's ``is_bnb_available()`` / ``is_bnb_4bit_available()``.
"""

from __future__ import annotations

from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from .._base import QuantizedUnloadMixin
from .layer import SparseLoraLayerMixin

__all__: list[str] = []

if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as _LoraLinear8bitLt

    class SparseLoraLinear8bitLt(QuantizedUnloadMixin, SparseLoraLayerMixin, _LoraLinear8bitLt):
        """SparseLoRA on a bitsandbytes LLM.int8 base."""

        def __repr__(self) -> str:
            return "sparse_lora." + super().__repr__().removeprefix("lora.")

    __all__ += ["SparseLoraLinear8bitLt"]

if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit

    class SparseLoraLinear4bit(QuantizedUnloadMixin, SparseLoraLayerMixin, _LoraLinear4bit):
        """SparseLoRA on a bitsandbytes 4-bit (nf4/fp4) base, QLoRA style."""

        def __repr__(self) -> str:
            return "sparse_lora." + super().__repr__().removeprefix("lora.")

    __all__ += ["SparseLoraLinear4bit"]
