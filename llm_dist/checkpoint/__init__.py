"""Checkpoints: sharded (DCP), elastic, crash-safe run snapshots that a run resumes from exactly."""

from llm_dist.checkpoint.manager import (
    CheckpointManager,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_checkpoint_tokenizer,
    read_config,
    read_config_dict,
    read_json,
    resolve_checkpoint,
    verify,
)
from llm_dist.checkpoint.rng import get_rng_state, set_rng_state

__all__ = ["CheckpointManager", "find_latest", "list_checkpoints", "load_checkpoint", "load_checkpoint_tokenizer",
           "read_config", "read_config_dict", "read_json", "resolve_checkpoint", "verify", "get_rng_state", "set_rng_state"]
