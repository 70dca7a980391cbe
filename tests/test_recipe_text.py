"""One recipe renderer and byte formatter for the CLI and the report."""

from __future__ import annotations

from service.recipe_text import format_bytes, format_number, recipe_items
from tests.ui import seed


def test_format_bytes_and_numbers() -> None:
    assert format_bytes(256 * 2**20) == "256 MiB"
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert format_bytes(3 * 2**40) == "3 TiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(None) == "—" and format_bytes(float("nan")) == "—" and format_bytes(True) == "—"
    assert format_number(128) == "128" and format_number(0.123456) == "0.1235" and format_number("x") == "—"


def test_recipe_items_follow_the_result() -> None:
    result = seed.result()
    items = {item.key: item for item in recipe_items(result)}
    assert items["recommended_batch_size"].value == 128
    assert items["recommended_batch_size"].hint == "128 per device × 1 device × 1 accumulation step"
    assert items["learning_rate"].text == "0.4" and items["learning_rate"].hint.startswith("linear")
    assert items["gradient_noise_scale"].value == result["gradient_noise_scale"]["value"]
    assert "measured on builtin:digits" in items["gradient_noise_scale"].hint
    assert not {"throughput", "memory", "device"} & set(items)  # the page plots those instead
    detailed = {item.key: item for item in recipe_items(result, details=True)}
    assert detailed["memory"].text.endswith("budget 256 MiB")
    assert detailed["device"].text == "cpu x86_64 test CPU"
    assert "samples/s at batch" in detailed["throughput"].text


def test_recipe_items_skip_what_the_result_lacks() -> None:
    assert recipe_items({}) == []
    only = recipe_items({"micro_batch_size": 8, "warnings": []})
    assert [item.key for item in only] == ["micro_batch_size"]
