"""Checkpoints: atomic, self-describing run snapshots that a run resumes from exactly."""

from llm_dist.checkpoint.manager import (
    CheckpointManager,
    find_latest,
    load_checkpoint,
    load_checkpoint_tokenizer,
    read_config,
)
from llm_dist.checkpoint.rng import get_rng_state, set_rng_state

__all__ = ["CheckpointManager", "find_latest", "load_checkpoint", "load_checkpoint_tokenizer", "read_config", "get_rng_state", "set_rng_state"]
