"""The zoo as the API shows it: names, defaults and a JSON schema for each config."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def describe_zoo() -> list[dict[str, Any]]:
    from models import config_schema, config_to_dict, list_models

    described = []
    for spec in list_models():
        default = spec.config_type()
        described.append(
            {
                "name": spec.name,
                "description": spec.description,
                "config_schema": config_schema(spec),
                "default_config": config_to_dict(default),
                "input_shape": list(spec.input_shape(default)),
                "input_dtype": spec.input_dtype,
                "supports_gradient_checkpointing": spec.supports_gradient_checkpointing,
            }
        )
    return described
