"""Registry lookups and strict config parsing: clients hear about every mistake, by field name."""

import ast
import sys
from pathlib import Path

import pytest

import models
from models import (
    MODELS,
    GPTConfig,
    MLPConfig,
    ResNetConfig,
    UnknownModelError,
    config_schema,
    config_to_dict,
    get_model,
    list_models,
    make_config,
)


def test_zoo_lists_three_models():
    assert list(MODELS) == ["mlp", "resnet", "gpt"]
    assert [spec.name for spec in list_models()] == list(MODELS)
    assert get_model("gpt") is MODELS["gpt"]


def test_unknown_model_is_a_key_error_listing_the_known_names():
    with pytest.raises(KeyError) as info:
        get_model("vgg")
    assert isinstance(info.value, UnknownModelError)
    assert str(info.value) == "unknown model 'vgg'; known models: mlp, resnet, gpt"


@pytest.mark.parametrize(
    ("name", "config_type"), [("mlp", MLPConfig), ("resnet", ResNetConfig), ("gpt", GPTConfig)]
)
def test_empty_config_gives_the_defaults(name, config_type):
    assert make_config(name, {}) == config_type()
    assert make_config(get_model(name), None) == config_type()


def test_unknown_field_is_named_with_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"unknown field 'layers' for mlp; allowed fields: input_dim, hidden_dims"
    ):
        make_config("mlp", {"layers": 3})


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gpt", {"n_layer": "4"}, "n_layer must be of type integer, got str"),
        ("gpt", {"n_layer": 4.0}, "n_layer must be of type integer, got float"),
        ("gpt", {"n_layer": True}, "n_layer must be of type integer, got bool"),
        ("gpt", {"bias": 1}, "bias must be of type boolean, got int"),
        ("gpt", {"dropout": "0.1"}, "dropout must be of type number, got str"),
        ("mlp", {"hidden_dims": 64}, "hidden_dims must be a list, got int"),
        ("mlp", {"hidden_dims": [64, "x"]}, "hidden_dims must be of type integer, got str"),
        ("resnet", {"depth": 101}, r"depth must be one of \[18, 34, 50\], got 101"),
        ("resnet", {"depth": 18.0}, r"depth must be one of \[18, 34, 50\], got 18.0"),
        ("resnet", {"stem": "tiny"}, r"stem must be one of \['cifar', 'imagenet'\]"),
    ],
)
def test_wrong_types_are_rejected_by_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(name, overrides)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("mlp", {"input_dim": 0}, "input_dim must be > 0"),
        ("mlp", {"hidden_dims": [8, -1]}, "hidden_dims must all be > 0"),
        ("mlp", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ("resnet", {"width": 0}, "width must be > 0"),
        ("resnet", {"image_size": -32}, "image_size must be > 0"),
        ("gpt", {"n_embd": 100, "n_head": 3}, "n_embd must be divisible by n_head"),
        ("gpt", {"block_size": 0}, "block_size must be > 0"),
        ("gpt", {"vocab_size": 0}, "vocab_size must be > 0"),
    ],
)
def test_bad_values_are_rejected_by_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(name, overrides)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetConfig(depth=19)
    with pytest.raises(ValueError, match="n_head must be > 0"):
        GPTConfig(n_head=0)


def test_lists_become_tuples_and_ints_become_floats():
    config = make_config("mlp", {"hidden_dims": [32, 16], "dropout": 0})
    assert config.hidden_dims == (32, 16)
    assert isinstance(config.dropout, float)
    assert hash(config) == hash(MLPConfig(hidden_dims=[32, 16]))  # configs are frozen and hashable


@pytest.mark.parametrize("name", list(MODELS))
def test_config_to_dict_round_trips(name):
    config = make_config(name, {})
    as_dict = config_to_dict(config)
    assert all(not isinstance(v, tuple) for v in as_dict.values())  # JSON-ready
    assert make_config(name, as_dict) == config


def test_config_schema_lists_types_defaults_and_choices():
    schema = config_schema("resnet")
    assert schema["additionalProperties"] is False
    assert schema["properties"]["depth"] == {"enum": [18, 34, 50], "default": 18}
    assert schema["properties"]["width"] == {"type": "integer", "default": 64}
    mlp = config_schema("mlp")["properties"]
    assert mlp["hidden_dims"] == {"type": "array", "items": {"type": "integer"}, "default": [256, 256]}
    assert mlp["dropout"] == {"type": "number", "default": 0.0}


def test_models_package_imports_only_torch_and_the_standard_library():
    allowed = {"torch", "models"} | set(sys.stdlib_module_names)
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
