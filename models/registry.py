"""The zoo's index: find a model by name and turn a client's JSON config into a checked dataclass.

`make_config` is strict on purpose: a misspelt field or a string where a number belongs is an
error the client should hear about, never a silently ignored override. It also refuses models too
large for any single device, from arithmetic alone: no module is built to find out.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from models import gpt, mlp, resnet
from models.base import ModelSpec, field_limits

# 2e10 fp32 parameters need 160 GB for weights and gradients alone, before any optimizer state or
# activation: more than any single accelerator holds, and a probe trains on one device.
MAX_PARAMETERS = 20_000_000_000
# Elements of one training sample's input (fp32: 1 GiB): larger samples cannot be probed at batch size 1.
MAX_SAMPLE_ELEMENTS = 2**28

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (mlp.SPEC, resnet.SPEC, gpt.SPEC)}


class UnknownModelError(KeyError):
    """A `KeyError` whose message reads well (`str(KeyError(msg))` would wrap it in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())


def make_config(spec: ModelSpec | str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Build `spec.config_type` from a JSON-like dict; unset fields keep their defaults.

    Raises ValueError naming the field for unknown fields, wrong types and values outside the
    field's limits, and naming the count and the limit for a model over MAX_PARAMETERS or a sample
    over MAX_SAMPLE_ELEMENTS.
    """
    spec = get_model(spec) if isinstance(spec, str) else spec
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise ValueError(f"config for {spec.name} must be an object, got {type(overrides).__name__}")
    hints = typing.get_type_hints(spec.config_type)
    allowed = [f.name for f in dataclasses.fields(spec.config_type)]
    kwargs = {}
    for name, value in overrides.items():
        if name not in hints:
            raise ValueError(f"unknown field {name!r} for {spec.name}; allowed fields: {', '.join(allowed)}")
        kwargs[name] = _coerce(name, hints[name], value)
    config = spec.config_type(**kwargs)
    _check_size(spec, config)
    return config


def parameter_count(spec: ModelSpec | str, config: Any) -> int | None:
    """The model's parameter count from its config alone (None where the spec cannot tell)."""
    spec = get_model(spec) if isinstance(spec, str) else spec
    return None if spec.parameter_count is None else spec.parameter_count(config)


def _check_size(spec: ModelSpec, config: Any) -> None:
    count = parameter_count(spec, config)
    if count is not None and count > MAX_PARAMETERS:
        raise ValueError(
            f"this {spec.name} config has {count:,} parameters, over the limit of {MAX_PARAMETERS:,} "
            f"(fp32 weights and gradients alone would need {count * 8 / 1e9:,.0f} GB)"
        )
    elements = 1
    for size in spec.input_shape(config):
        elements *= size
    if elements > MAX_SAMPLE_ELEMENTS:
        raise ValueError(
            f"one input sample of this {spec.name} config has {elements:,} elements, over the limit of "
            f"{MAX_SAMPLE_ELEMENTS:,}"
        )


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of every field (tuples become lists); `make_config` accepts it back."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }


def config_schema(spec: ModelSpec | str) -> dict[str, Any]:
    """A JSON Schema of the config (types, defaults, allowed values) for the API docs and `/v1/models`.

    Each bounded field shows the limits its config's `__post_init__` enforces (for a list: on its items,
    and `maxItems`).
    """
    spec = get_model(spec) if isinstance(spec, str) else spec
    hints = typing.get_type_hints(spec.config_type)
    defaults = config_to_dict(spec.config_type())
    limits = field_limits(spec.config_type)
    properties = {
        name: _with_limits({**_json_type(hint), "default": defaults[name]}, limits.get(name, {}))
        for name, hint in hints.items()
    }
    return {
        "title": spec.config_type.__name__,
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


def _with_limits(schema: dict[str, Any], limits: dict[str, float]) -> dict[str, Any]:
    if schema.get("type") == "array":
        item_limits = {k: v for k, v in limits.items() if k != "maxItems"}
        extra = {"maxItems": limits["maxItems"]} if "maxItems" in limits else {}
        return {**schema, "items": {**schema["items"], **item_limits}, **extra}
    return {**schema, **limits}


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _json_type(hint: Any) -> dict[str, Any]:
    if typing.get_origin(hint) is Literal:
        return {"enum": list(typing.get_args(hint))}
    if typing.get_origin(hint) is tuple:
        return {"type": "array", "items": _json_type(typing.get_args(hint)[0])}
    return {"type": _JSON_TYPES[hint]}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check `value` against the field's type hint; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(name, item, v) for v in value)
    if hint is float and type(value) is int:
        return float(value)
    # `type(...) is`, not isinstance: bool is an int subclass, and True must not pass for a layer count.
    if hint in _JSON_TYPES and type(value) is hint:
        return value
    if hint in _JSON_TYPES:
        raise ValueError(f"{name} must be of type {_JSON_TYPES[hint]}, got {type(value).__name__}")
    raise TypeError(f"unsupported config field type for {name}: {hint!r}")  # a zoo bug, not client input
