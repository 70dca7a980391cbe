"""The model zoo: config dataclasses, modules, synthetic batches and losses the probe engine trains.

Imports torch only, so a bare GPU box can run probes without the web stack.
"""

from models.base import ModelSpec
from models.gpt import GPTConfig
from models.mlp import MLPConfig
from models.registry import (
    MAX_PARAMETERS,
    MAX_SAMPLE_ELEMENTS,
    MODELS,
    UnknownModelError,
    config_schema,
    config_to_dict,
    get_model,
    list_models,
    make_config,
    parameter_count,
)
from models.resnet import ResNetConfig

__all__ = [
    "MAX_PARAMETERS",
    "MAX_SAMPLE_ELEMENTS",
    "MODELS",
    "GPTConfig",
    "MLPConfig",
    "ModelSpec",
    "ResNetConfig",
    "UnknownModelError",
    "config_schema",
    "config_to_dict",
    "get_model",
    "list_models",
    "make_config",
    "parameter_count",
]
