"""SPP: sparsity-preserved PEFT, ``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``, as a peft adapter type (``SPP``)."""

from .config import SPPConfig
from .layer import SPPLinear
from .model import SPPModel

__all__ = ["SPPConfig", "SPPLinear", "SPPModel"]
