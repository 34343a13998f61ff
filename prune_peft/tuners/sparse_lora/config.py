"""Configuration of SparseLoRA, the SQFT SparsePEFT adapter (Muñoz et al., EMNLP Findings 2024, arXiv 2410.03750)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig

from .._base import SparseConfigMixin, validate_lora_fields
from .._registry import ensure_peft_type

__all__ = ["SparseLoraConfig"]

GRAD_MODES = ("exact", "lors", "lors_scaled")


@dataclass
class SparseLoraConfig(SparseConfigMixin, LoraConfig):
    """LoRA whose update keeps the base's sparsity: ``ΔW = M ⊙ s·B A`` (SQFT SparsePEFT).

    ``M`` is the boolean mask of the base weight (``W ≠ 0``, on the dequantized weight for bitsandbytes bases),
    fixed when the adapter is created, saved with it, and applied in the forward pass and in every merge — so
    ``merge_and_unload()`` returns a model with exactly the zeros of the pruned base and the outputs of the
    unmerged one. All ``LoraConfig`` fields work as in LoRA (``r``, ``lora_alpha``, ``target_modules``,
    ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``rank_pattern``, …) except those that would rewrite
    the base or change the update's form (DoRA, ``lora_bias``, PiSSA/OLoRA/CorDA/LoftQ inits): they raise.

    Args:
        require_sparsity (`bool`, *optional*, defaults to `True`):
            Refuse target modules whose weight has no zero (usually: the model was not pruned).
        grad_mode (`str`, *optional*, defaults to `"exact"`):
            `"exact"`: true gradients of the masked update (one extra d_out×d_in product per layer in backward).
            `"lors"`: LoRS's rearrangement (Hu et al., arXiv 2501.08582) as its ``LorsFn`` computes it: the factor
            gradients drop the mask *and the scale s* (``∂L/∂B = Gᵀ(X Aᵀ)``, ``∂L/∂A = (G B)ᵀ X``), O(r·(d_in + d_out))
            per token; the forward pass and merges stay exactly masked. With s ≠ 1 this changes the effective
            learning rate of the factors by 1/s relative to `"exact"`.
            `"lors_scaled"`: the same rearrangement times s (plain-LoRA gradients; what `"lors"` meant before
            prune_peft made it match the reference).
        use_semi_structured (`bool`, *optional*, defaults to `False`):
            Run the 2:4 base on sparse tensor cores (``prune_peft.kernels.enable_semi_structured``); needs every
            target module to be 2:4. Exact dense fallback (one warning) on CPU, pre-sm80 GPUs and fp32.

    Example:

        ```py
        >>> import prune_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(pruned_model, prune_peft.SparseLoraConfig(r=16, target_modules="all-linear"))
        >>> merged = model.merge_and_unload()  # same zeros as pruned_model
        ```
    """

    require_sparsity: bool = field(
        default=True,
        metadata={"help": "Raise when a target module's weight has no zeros (the base is not pruned)."},
    )
    grad_mode: str = field(
        default="exact",
        metadata={
            "help": "'exact': exact gradients of M ⊙ s·BA; 'lors': LoRS's rearranged factor gradients (faster; mask "
            "and scale s dropped in the factor gradients only, as LoRS's LorsFn); 'lors_scaled': the same times s."
        },
    )
    use_semi_structured: bool = field(
        default=False,
        metadata={
            "help": "Run the 2:4 base (and the merged 2:4 update) on sparse tensor cores (cuSPARSELt/CUTLASS) on "
            "sm80+ GPUs in fp16/bf16; elsewhere the exact dense path runs with one warning. Every target module "
            "must be 2:4 sparse (ValueError otherwise). See prune_peft.kernels.enable_semi_structured."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("SPARSE_LORA")
        validate_lora_fields(self, "sparse_lora")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"sparse_lora: grad_mode={self.grad_mode!r} is not supported (allowed: {GRAD_MODES})")
        from .layer import layer_mapping_sparse_lora

        # re-runs on every load (from_peft_type builds the config through __init__), so nothing to persist
        self._register_custom_module(layer_mapping_sparse_lora())

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's ``save_pretrained``, then the model card's prune_peft section (peft writes its card first)."""
        from ...hub import write_adapter_card  # hub owns every card; imported here so tuners never need it at import

        super().save_pretrained(save_directory, **kwargs)
        write_adapter_card(save_directory, self)
