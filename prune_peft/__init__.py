"""prune_peft: pruning-aware fine-tuning as a one-line addition to transformers / peft / trl.

Importing the package registers its PEFT adapter types with peft, so ``PeftModel.from_pretrained`` can load
prune_peft adapters after ``import prune_peft``.
"""

from .callbacks.qtuning import QTuningCallback, QTuningConfig
from .evaluation import perplexity, sparsity_report
from .models import load_model, load_model_and_tokenizer, load_tokenizer
from .pruning.oneshot import PruneReport, prune
from .tuners import SparseLoraConfig, SPPConfig  # registers SPARSE_LORA and SPP with peft

__version__ = "0.1.0"

__all__ = [
    "PruneReport",
    "QTuningCallback",
    "QTuningConfig",
    "SPPConfig",
    "SparseLoraConfig",
    "__version__",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "perplexity",
    "prune",
    "sparsity_report",
]
