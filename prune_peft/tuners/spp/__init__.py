"""SPP: sparsity-preserved PEFT, ``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``, as a peft adapter type (``SPP``)."""

from .._registry import register_adapter_type
from .config import SPPConfig
from .layer import SPPLinear
from .model import SPPModel

__all__ = ["SPPConfig", "SPPLinear", "SPPModel"]

register_adapter_type("spp", SPPConfig, SPPModel, prefix="lora_")
