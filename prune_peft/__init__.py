"""prune_peft: pruning-aware fine-tuning as a one-line addition to transformers / peft / trl.

Importing the package registers its PEFT adapter types with peft (the explicit ``register_adapter_types()`` call
below), so ``PeftModel.from_pretrained`` can load prune_peft adapters after ``import prune_peft``.
"""

from .callbacks._trainer import PruneTrainerMixin, lazy_trainer
from .callbacks.prune import PruneCallback, register_driver
from .callbacks.qtuning import QTuningCallback, QTuningConfig, QTuningTrainerMixin
from .evaluation import perplexity, sparsity_report
from .kernels import enable_semi_structured  # also makes prune_peft.kernels available
from .models import load_model, load_model_and_tokenizer, load_tokenizer
from .pruning.oneshot import PruneReport, prune
from .pruning.structured import compact, load_compacted, save_compacted
from .tuners import LoRAPruneConfig, SparseLoraConfig, SPPConfig, register_adapter_types

register_adapter_types()  # SPARSE_LORA, SPP, LORAPRUNE become peft types (idempotent)

__version__ = "0.1.0"

__all__ = [
    "LoRAPruneConfig",
    "PruneCallback",
    "PruneReport",
    "PruneSFTTrainer",
    "PruneTrainer",
    "PruneTrainerMixin",
    "QTuningCallback",
    "QTuningConfig",
    "QTuningSFTTrainer",
    "QTuningTrainer",
    "QTuningTrainerMixin",
    "SPPConfig",
    "SparseLoraConfig",
    "__version__",
    "compact",
    "enable_semi_structured",
    "load_compacted",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "perplexity",
    "prune",
    "register_adapter_types",
    "register_driver",
    "save_compacted",
    "sparsity_report",
]


def __getattr__(name: str):
    return lazy_trainer(__name__, name)  # PruneTrainer, PruneSFTTrainer, QTuningTrainer, QTuningSFTTrainer
