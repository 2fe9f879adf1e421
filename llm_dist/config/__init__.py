"""Typed, nested run configuration: dataclasses with defaults, loaded from YAML, overridden on the CLI.

Precedence (later wins): dataclass defaults < `model.preset` < YAML file (`--config path`) < dotted
`key=value` arguments. Every value is checked against its field's type; unknown keys name the closest
valid one. `Config.validate(world_size)` checks every invariant in one place and raises `ConfigError`
with a one-line message *before* any process group, file or directory is touched.

Layout: `schema.py` (the dataclasses), `loading.py` (YAML, presets, overrides, CLI parsing),
`validation.py` (the invariants and the layer layouts derived from them). Everything is importable from
`llm_dist.config`.
"""

from llm_dist.config.loading import apply_dict, apply_override, flat_dict, help_text, load_config, parse_args
from llm_dist.config.schema import (AttnConfig, ChatConfig, CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig,
                                    LoggingConfig, LoRAConfig, LossConfig, ModelConfig, MoEConfig, OptimConfig,
                                    ParallelConfig, PPOConfig, ProfileConfig, RewardConfig, RLConfig,
                                    RopeScalingConfig, SFTConfig,
                                    TokenizerConfig, TrainConfig)
from llm_dist.config.validation import layer_kinds, moe_layers, validate

__all__ = ["AttnConfig", "ChatConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig",
           "LoRAConfig", "LossConfig", "ModelConfig", "MoEConfig", "OptimConfig", "PPOConfig", "ParallelConfig", "ProfileConfig",
           "RLConfig", "RewardConfig", "RopeScalingConfig", "SFTConfig", "TokenizerConfig", "TrainConfig", "apply_dict", "apply_override",
           "flat_dict", "help_text", "layer_kinds", "load_config", "moe_layers", "parse_args", "validate"]
