"""Typed, frozen run configuration: `schema` holds the sections, `loading` reads YAML into them.

    cfg = load_config("configs/demo.yaml", ("sft.max_steps=10",))
"""
from pdpo_jax.config.loading import ConfigError, build, load_config, to_dict
from pdpo_jax.config.schema import (CheckpointSection, Config, DataSection, DpoSection, EvalSection,
                                    JudgeSection, MeshSection, ModelSection, NegativesSection,
                                    OptimizerConfig, Range, ResponseSection, RewardSection,
                                    RlSection, RunSection, SftSection, StageSection)

__all__ = ["CheckpointSection", "Config", "ConfigError", "DataSection", "DpoSection", "EvalSection",
           "JudgeSection", "MeshSection", "ModelSection", "NegativesSection", "OptimizerConfig",
           "Range", "ResponseSection", "RewardSection", "RlSection", "RunSection", "SftSection",
           "StageSection", "build",
           "load_config", "to_dict"]
