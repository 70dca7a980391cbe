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
    parameter_count,
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
    assert schema["properties"]["width"] == {"type": "integer", "default": 64, "minimum": 1, "maximum": 4096}
    mlp = config_schema("mlp")["properties"]
    assert mlp["hidden_dims"] == {
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": 2**20},
        "maxItems": 64,
        "default": [256, 256],
    }
    assert mlp["dropout"] == {"type": "number", "default": 0.0, "minimum": 0.0, "exclusiveMaximum": 1.0}


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


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gpt", {"n_layer": 1_000_000}, r"n_layer must be <= 1024 \(got 1000000\)"),
        ("gpt", {"n_embd": 2**40}, r"n_embd must be <= 65536"),
        ("mlp", {"hidden_dims": [2**62]}, r"hidden_dims must all be <= 1048576"),
        ("mlp", {"input_dim": 2**63}, r"input_dim must be <= 16777216"),
        ("mlp", {"hidden_dims": [8] * 65}, r"hidden_dims may list at most 64 values, got 65"),
        ("resnet", {"width": 2**40}, r"width must be <= 4096"),
        ("resnet", {"image_size": 10**6}, r"image_size must be <= 4096"),
    ],
)
def test_every_size_has_an_upper_bound(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(name, overrides)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("gpt", {"n_layer": 1024, "n_embd": 2**16, "n_head": 64}),
        ("mlp", {"input_dim": 2**24, "hidden_dims": [2**20]}),
        ("resnet", {"depth": 50, "width": 4096}),
    ],
)
def test_models_over_the_parameter_limit_are_refused_naming_count_and_limit(name, overrides):
    count = parameter_count(name, get_model(name).config_type(**overrides))
    assert count > models.MAX_PARAMETERS
    with pytest.raises(ValueError, match=rf"has {count:,} parameters, over the limit of 20,000,000,000"):
        make_config(name, overrides)


def test_samples_over_the_element_limit_are_refused():
    with pytest.raises(ValueError, match=r"268,435,456"):
        make_config("resnet", {"image_size": 4096, "in_channels": 1024, "width": 8})


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("mlp", {}),
        ("mlp", {"hidden_dims": []}),
        ("mlp", {"input_dim": 7, "hidden_dims": [3, 5, 7], "num_classes": 2}),
        ("gpt", {}),
        ("gpt", {"bias": False, "n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 9, "block_size": 17}),
        ("resnet", {}),
        ("resnet", {"depth": 34, "stem": "imagenet", "width": 16, "in_channels": 1}),
        ("resnet", {"depth": 50, "width": 8, "num_classes": 7}),
    ],
)
def test_parameter_count_is_exact_without_building(name, overrides):
    import torch

    spec, config = get_model(name), make_config(name, overrides)
    with torch.device("meta"):
        module = spec.build(config, False)
    assert parameter_count(spec, config) == sum(p.numel() for p in module.parameters())
