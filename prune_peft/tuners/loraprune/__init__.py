"""LoRAPrune (Zhang et al., ACL Findings 2024, arXiv 2305.18403) as a peft adapter type (``LORAPRUNE``)."""

from .config import LoRAPruneConfig
from .layer import LoRAPruneLayer, LoRAPruneLinear
from .model import LoRAPruneModel, PruneBlock, default_excluded_layers
from .pruner import LoRAPruner

__all__ = [
    "LoRAPruneConfig",
    "LoRAPruneLayer",
    "LoRAPruneLinear",
    "LoRAPruneModel",
    "LoRAPruner",
    "PruneBlock",
    "default_excluded_layers",
]
