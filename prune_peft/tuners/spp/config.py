"""Configuration of SPP, sparsity-preserved PEFT (Lu et al., ICML 2024, arXiv 2405.16057)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig

from .._base import SparseConfigMixin, validate_lora_fields
from .._registry import ensure_peft_type

__all__ = ["SPPConfig"]

FORWARD_MODES = ("blockwise", "fused")
ON_INDIVISIBLE = ("error", "uneven")


@dataclass
class SPPConfig(SparseConfigMixin, LoraConfig):
    """SPP: a row/column rescaling of the base weight, ``ΔW = s·(Rep(W_row) ⊙ w_col 1ᵀ) ⊙ W``.

    Per adapted layer the trainable parameters are ``W_row ∈ R^{R×d_in}`` (``lora_A``, Kaiming-uniform) and
    ``w_col ∈ R^{d_out}`` (``lora_B``, zero-initialised, so the adapter starts as the identity). ``Rep`` repeats row
    k of ``W_row`` over the k-th of R equal blocks of output rows. Since ΔW is proportional to W element-wise, every
    zero of the pruned base stays zero during training and after merging. ``s = lora_alpha / r`` as in LoRA; in SPP
    ``r`` only sets that scale (the paper's code: r=8, lora_alpha=16, R=16, learning rate ≈4e-3).

    Args:
        n_blocks (`int`, *optional*, defaults to `16`):
            R, the number of row blocks (rows of ``W_row``); the paper hard-codes 16.
        on_indivisible (`str`, *optional*, defaults to `"error"`):
            When ``d_out`` is not a multiple of R: `"error"` raises, `"uneven"` uses blocks of ⌈d_out/R⌉ and
            ⌊d_out/R⌋ rows (``torch.tensor_split`` order).
        forward_mode (`str`, *optional*, defaults to `"fused"`):
            `"fused"`: the update is folded into the base matmul (``x (W + ΔW)ᵀ``), the d_out×d_in product exists only
            transiently and is recomputed in backward — fastest. `"blockwise"`: SPP's memory-optimised form, one row
            block at a time (``(x ⊙ W_row[k]) W_kᵀ``); no d_out×d_in temporary at all, at ≈2× the branch FLOPs.
        require_sparsity (`bool`, *optional*, defaults to `True`):
            Refuse target modules whose weight has no zero (usually: the model was not pruned).
    """

    lora_alpha: int = field(
        default=16, metadata={"help": "Alpha; the update is scaled by lora_alpha / r (SPP: 16/8)."}
    )
    n_blocks: int = field(default=16, metadata={"help": "Number R of row blocks (rows of W_row); SPP uses 16."})
    on_indivisible: str = field(
        default="error",
        metadata={"help": "'error' or 'uneven': what to do when out_features is not a multiple of n_blocks."},
    )
    forward_mode: str = field(
        default="fused",
        metadata={"help": "'fused' (update folded into the base matmul) or 'blockwise' (SPP memory-optimised form)."},
    )
    require_sparsity: bool = field(
        default=True,
        metadata={"help": "Raise when a target module's weight has no zeros (the base is not pruned)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("SPP")
        validate_lora_fields(self, "spp", inits=(True, False))
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 1:
            raise ValueError(f"spp: n_blocks must be a positive integer (paper default 16), got {self.n_blocks!r}")
        if self.on_indivisible not in ON_INDIVISIBLE:
            raise ValueError(
                f"spp: on_indivisible={self.on_indivisible!r} is not supported (allowed: {ON_INDIVISIBLE})"
            )
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"spp: forward_mode={self.forward_mode!r} is not supported (allowed: {FORWARD_MODES})")
        from .layer import layer_mapping_spp

        self._register_custom_module(layer_mapping_spp())

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's ``save_pretrained``, then the model card's prune_peft section (peft writes its card first)."""
        from ...hub import write_adapter_card  # hub owns every card; imported here so tuners never need it at import

        super().save_pretrained(save_directory, **kwargs)
        write_adapter_card(save_directory, self)
