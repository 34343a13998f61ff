"""Configuration of LoRAPrune (Zhang et al., ACL Findings 2024, arXiv 2305.18403)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

from ...sparsity.masks import parse_pattern
from ...sparsity.schedules import PRUNE_SCHEDULES, SCHEDULE_KEYS, check_schedule_values
from .._registry import ensure_peft_type, is_retype_guard, strip_retype_guard, with_retype_guard

__all__ = ["IMPORTANCE", "SCHEDULES", "STRUCTURED", "LoRAPruneConfig"]

STRUCTURED = ("head+channel", "head", "channel")
ELEMENTWISE = ("unstructured",)  # plus any "N:M"
IMPORTANCE = ("lora", "magnitude", "grad")
SCHEDULES = PRUNE_SCHEDULES
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_importance_beta(beta) -> None:
    """ValueError unless the moving-average factor β is in [0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"loraprune: importance_beta must be in [0, 1), got {beta!r}")


def _refuse(field_name: str, value, allowed: str) -> None:
    raise ValueError(f"loraprune: {field_name}={value!r} is not supported (allowed: {allowed})")


@dataclass
class LoRAPruneConfig(LoraConfig):
    """LoRA plus masks learned while fine-tuning, scored from LoRA weights and gradients only (LoRAPrune).

    Importance ``I = |Ĝ ⊙ (W + s·BA)|`` with ``Ĝ = G_B·A + B·G_A − G_B·G_A`` (no gradient of the frozen base is
    ever formed), grouped per GQA unit (one KV head with its query heads) and per MLP channel, L2-normalised per module,
    summed per block and smoothed by a moving average over optimizer steps. The tuner runs it, AdaLoRA-style:
    ``model.base_model.update_and_allocate(global_step)`` after each ``optimizer.step()`` in any loop, or
    :class:`prune_peft.PruneCallback` from the Trainer; masks grow on a cubic schedule and land exactly on
    ``target_sparsity`` at the end.

    Structured masks multiply the outputs of q/k/v (whole GQA units) and gate/up (channels); o_proj/down_proj see zero
    inputs there, so the masked model equals the compacted one (:func:`prune_peft.compact`).

    Args:
        target_sparsity (`float`, *optional*):
            Fraction of groups removed per prunable block (GQA units and MLP channels alike; rounded to the nearest
            count) or of weights per module (``"unstructured"``). Default 0.5; implied by ``"N:M"`` patterns.
        structure (`str`, defaults to `"head+channel"`):
            `"head+channel"`, `"head"`, `"channel"`, `"unstructured"` or an `"N:M"` pattern such as `"2:4"`.
            Element-wise structures use the same score per weight; their merge masks ``W + s·BA``.
        importance (`str`, defaults to `"lora"`):
            `"lora"` (the formula above), `"magnitude"` (``|W + s·BA|``), or `"grad"` (the reference's third metric:
            the true base gradient, ``|∂L/∂W ⊙ (W + s·BA)|``). For `"grad"` the pruner makes the scored base weights
            require grad when pruning is prepared and drops their ``.grad`` right after scoring, before
            ``optimizer.step()``, so the base is never trained (float bases only; bitsandbytes bases are refused).
        importance_beta (`float`, defaults to `0.9`): moving-average factor β in ``Ī ← β·Ī + (1 − β)·I``, Ī starting
            at zero as in the reference; a step with any non-finite score leaves every Ī unchanged.
        schedule (`str`, defaults to `"cubic"`): `"cubic"` (Zhu & Gupta) or `"linear"`, over optimizer steps.
        initial_sparsity, warmup, cooldown (`float`): p0 and the warmup / cooldown fractions of the schedule.
        prune_every (`int`, defaults to `10`): optimizer steps between mask updates (the last one always fires).
        schedule_steps (`int`, *optional*): schedule length T; default the run's length (the Trainer's
            ``max_steps``, or ``total_steps`` of ``model.base_model.prepare_pruning``).
        exclude_layers (`list[int]`, *optional*): decoder blocks never pruned; default the first ⌊10 %⌋ and the last.
        uniform (`bool`, defaults to `False`): every block — the ones LoRAPrune would exclude by default included —
            keeps the same number of GQA units and MLP channels (``n_pruned(p, groups)`` per block, rounded for
            channels; *which* groups go is decided per block from its own moving-average importance). ``compact()``
            then writes a stock config that plain ``from_pretrained`` loads (no prune_peft import).
        channel_multiple (`int`, defaults to `64`): with ``uniform=True`` the kept channel count is rounded to the
            nearest multiple of this (at least one multiple, at most the full width).

    Example:

        ```py
        >>> import prune_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(dense, prune_peft.LoRAPruneConfig(r=8, target_sparsity=0.5))
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[prune_peft.PruneCallback()])
        ```
    """

    r: int = field(default=8, metadata={"help": "LoRA rank (LoRAPrune default 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; scaling s = lora_alpha / r (default 16)."})
    target_modules: Optional[list[str] | str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "Modules to adapt; structured pruning needs q/k/v (heads) and gate/up (channels)."},
    )
    target_sparsity: Optional[float] = field(
        default=None,
        metadata={"help": "Final fraction of groups (or weights) removed per prunable block/module; default 0.5."},
    )
    structure: str = field(
        default="head+channel",
        metadata={"help": "'head+channel', 'head', 'channel', 'unstructured' or an 'N:M' pattern like '2:4'."},
    )
    importance: str = field(
        default="lora", metadata={"help": "'lora' (LoRA-guided), 'magnitude' (|W + sBA|) or 'grad' (true ∂L/∂W)."}
    )
    importance_beta: float = field(default=0.9, metadata={"help": "Moving-average factor of the importance."})
    schedule: str = field(default="cubic", metadata={"help": "'cubic' or 'linear' sparsity schedule."})
    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity p0 at the start of the schedule."})
    warmup: float = field(default=0.1, metadata={"help": "Fraction of the schedule before pruning starts."})
    cooldown: float = field(default=0.1, metadata={"help": "Fraction of the schedule after the target is reached."})
    prune_every: int = field(default=10, metadata={"help": "Optimizer steps between mask updates (> 0)."})
    schedule_steps: Optional[int] = field(
        default=None, metadata={"help": "Schedule length in optimizer steps; default the Trainer's max_steps."}
    )
    exclude_layers: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Decoder block indices never pruned; default: the first int(0.1·L) and the last block."},
    )
    uniform: bool = field(
        default=False,
        metadata={
            "help": "Prune every block (none excluded) to the same number of GQA units and MLP channels, so the "
            "compacted model has a stock config that from_pretrained loads without prune_peft."
        },
    )
    channel_multiple: int = field(
        default=64,
        metadata={"help": "uniform=True: kept MLP channels are rounded to a multiple of this (kernel-friendly)."},
    )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's ``save_pretrained``, then the model card's prune_peft section (peft writes its card first)."""
        from ...hub import write_adapter_card  # hub owns every card; imported here so tuners never need it at import

        super().save_pretrained(save_directory, **kwargs)
        write_adapter_card(save_directory, self)

    def __post_init__(self) -> None:
        # read from a saved adapter_config.json (to_dict wrote the marker): a sharded base refuses it even when
        # is_trainable=True leaves inference_mode False (model._check_sharded_base)
        self._pp_saved = is_retype_guard(getattr(self, "target_parameters", None))
        strip_retype_guard(self)  # the marker to_dict writes: no parameter targets (before LoraConfig's checks)
        super().__post_init__()
        self.peft_type = ensure_peft_type("LORAPRUNE")
        self._validate()
        from .layer import layer_mapping_loraprune

        # re-runs on every load (from_peft_type builds the config through __init__); float and bitsandbytes bases
        self._register_custom_module(layer_mapping_loraprune())

    def to_dict(self) -> dict:
        """peft's dict, with prune_peft's marker in ``target_parameters``: a copy of the folder edited to
        ``"peft_type": "LORA"`` is refused by stock peft / transformers before anything is injected (as plain LoRA
        the masks would be dropped and a merge would fill the pruned weights; ``_registry.retype_guard``)."""
        return with_retype_guard(super().to_dict(), self.peft_type)

    @property
    def nm(self):
        """The N:M pattern of ``structure`` (None for other structures)."""
        if self.structure in STRUCTURED or self.structure in ELEMENTWISE:
            return None
        return parse_pattern(self.structure, arg="structure")

    @property
    def structured(self) -> bool:
        return self.structure in STRUCTURED

    def _validate(self) -> None:
        for flag in ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora"):
            if getattr(self, flag, False):
                _refuse(flag, True, "False")
        if getattr(self, "target_parameters", None):
            _refuse("target_parameters", self.target_parameters, "None (only nn.Linear modules)")
        if self.structure not in STRUCTURED and self.structure not in ELEMENTWISE:
            try:
                nm = parse_pattern(self.structure, arg="structure")
            except ValueError:
                nm = None
            if nm is None:
                _refuse("structure", self.structure, "'head+channel', 'head', 'channel', 'unstructured', 'N:M'")
            implied = nm.sparsity
            if self.target_sparsity is not None and abs(self.target_sparsity - implied) > 1e-9:
                raise ValueError(
                    f"loraprune: target_sparsity={self.target_sparsity!r} contradicts structure={self.structure!r}, "
                    f"which removes {implied:g} of the weights; leave target_sparsity unset"
                )
            self.target_sparsity = implied
        if self.target_sparsity is None:
            self.target_sparsity = 0.5
        try:  # the one validation of schedule settings, shared with the tuner, PruneCallback and its drivers
            check_schedule_values(**{k: getattr(self, k) for k in SCHEDULE_KEYS})
        except ValueError as exc:
            raise ValueError(f"loraprune: {exc}") from None
        if self.importance not in IMPORTANCE:
            _refuse("importance", self.importance, ", ".join(map(repr, IMPORTANCE)))
        check_importance_beta(self.importance_beta)
        if self.exclude_layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.exclude_layers):
                raise ValueError(
                    f"loraprune: exclude_layers must be a list of block indices, got {self.exclude_layers!r}"
                )
            self.exclude_layers = sorted(set(self.exclude_layers))
        self._validate_uniform()

    def _validate_uniform(self) -> None:
        """``uniform=True``: a stock config has one size for every block, so no block can be left unpruned."""
        if not isinstance(self.uniform, bool):
            raise ValueError(f"loraprune: uniform must be True or False, got {self.uniform!r}")
        m = self.channel_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"loraprune: channel_multiple must be a positive integer, got {m!r}")
        if not self.uniform:
            return
        if not self.structured:
            _refuse("uniform", True, f"False with structure={self.structure!r} (uniform needs a structured pattern)")
        if self.exclude_layers:
            raise ValueError(
                f"loraprune: uniform=True prunes every decoder block to the same size (a stock config has one "
                f"num_key_value_heads and one intermediate_size), so exclude_layers={self.exclude_layers!r} cannot "
                "be honoured; drop exclude_layers or use uniform=False (compacted output then needs prune_peft)"
            )
        self.exclude_layers = []  # no default exclusion: excluded blocks would keep their full size
