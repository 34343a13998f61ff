"""The SPP tuner: peft's LoraModel with all-or-nothing injection, checked merges and sparse unloads."""

from __future__ import annotations

from peft.tuners.lora import LoraModel

from .._base import SparseTunerMixin

__all__ = ["SPPModel"]


class SPPModel(SparseTunerMixin, LoraModel):
    """Creates SPP adapters (Lu et al., ICML 2024) on a pruned model; see :class:`SPPConfig`.

    Example:

        ```py
        >>> import prune_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(pruned_model, prune_peft.SPPConfig(target_modules="all-linear"))
        ```
    """

    method = "spp"

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError("spp: add_weighted_adapter is not supported (SPP adapters are not B·A products)")
