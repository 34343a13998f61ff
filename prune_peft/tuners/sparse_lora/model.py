"""The SparseLoRA tuner: peft's LoraModel with all-or-nothing injection, checked merges and sparse unloads."""

from __future__ import annotations

from peft.tuners.lora import LoraModel

from ...kernels.semi_structured import enable_for_bases
from .._base import SparseTunerMixin, _remove_adapter_layers, sparse_layers

__all__ = ["SparseLoraModel"]


class SparseLoraModel(SparseTunerMixin, LoraModel):
    """Creates SparseLoRA (SQFT SparsePEFT) adapters on a pruned model; see :class:`SparseLoraConfig`.

    Example:

        ```py
        >>> import prune_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(pruned_model, prune_peft.SparseLoraConfig(r=16, target_modules="all-linear"))
        ```
    """

    # note: prefix, tuner_layer_cls and target_module_mapping are inherited from LoraModel ("lora_")
    method = "sparse_lora"

    def inject_adapter(self, model, adapter_name: str, *args, **kwargs) -> None:
        before = {id(m) for m in model.modules()}
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if getattr(self.peft_config.get(adapter_name), "use_semi_structured", False):
            layers = sparse_layers(model).items()
            bases = {name: layer.get_base_layer() for name, layer in layers if adapter_name in layer.lora_A}
            try:  # validates every target (2:4) before replacing anything
                enable_for_bases(model, bases)
            except BaseException:
                _remove_adapter_layers(model, adapter_name, before)
                raise

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs):
        """peft's adapter arithmetic; the new adapter is masked like every SparseLoRA adapter.

        A masked update ``M ⊙ B A`` is generally full-rank, so SVD-based combinations are approximations. For a single
        adapter the exact re-weighting is the linear one, which is used instead of ``"svd"``.
        """
        if len(adapters) == 1 and combination_type == "svd":
            combination_type = "linear"
        return super().add_weighted_adapter(
            adapters, weights, adapter_name, combination_type=combination_type, **kwargs
        )
