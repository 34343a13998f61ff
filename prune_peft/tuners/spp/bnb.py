"""SPP on bitsandbytes bases (QLoRA style): importable only when bitsandbytes is installed.

As peft's ``peft.tuners.lora.bnb``, this module imports bitsandbytes at import time and defines its classes only for
the quantization kinds the installed bitsandbytes provides; :func:`~prune_peft.tuners.spp.layer.layer_mapping_spp`
imports it lazily, after peft's ``is_bnb_available()`` / ``is_bnb_4bit_available()``.
"""

from __future__ import annotations

from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from .._base import QuantizedUnloadMixin
from .layer import SPPLayerMixin

__all__: list[str] = []

if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as _LoraLinear8bitLt

    class SPPLinear8bitLt(QuantizedUnloadMixin, SPPLayerMixin, _LoraLinear8bitLt):
        """SPP on a bitsandbytes LLM.int8 base."""

        def __repr__(self) -> str:
            return "spp." + super().__repr__().removeprefix("lora.")

    __all__ += ["SPPLinear8bitLt"]

if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit

    class SPPLinear4bit(QuantizedUnloadMixin, SPPLayerMixin, _LoraLinear4bit):
        """SPP on a bitsandbytes 4-bit (nf4/fp4) base, QLoRA style."""

        def __repr__(self) -> str:
            return "spp." + super().__repr__().removeprefix("lora.")

    __all__ += ["SPPLinear4bit"]
