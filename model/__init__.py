"""The one model package: config, presets, sizing, the hybrid LM, its cache and weights I/O.

Imports nothing from the rest of the project.
"""

from model.config import ModelConfig, strategic_pattern
from model.documents import DocumentLayout, positions_from_seq_idx
from model.hybrid import HybridLM
from model.sizing import count_params, train_flops_per_token

__all__ = [
    "HybridLM",
    "ModelConfig",
    "count_params",
    "positions_from_seq_idx",
    "strategic_pattern",
    "train_flops_per_token",
]
