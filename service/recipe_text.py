"""The recipe as labelled rows of text, and the number and byte formatting behind them: one renderer for
the CLI's table and the report page."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, text, NaN, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def as_dict(value: Any) -> dict[str, Any]:
    """`value` when it is a dict, else an empty one (results are read defensively)."""
    return value if isinstance(value, dict) else {}


def format_bytes(value: Any) -> str:
    """Bytes in binary units, three significant digits ("256 MiB", "1.5 GiB"); "—" for no number."""
    n = number(value)
    if n is None:
        return "—"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_number(value: Any, digits: int = 4) -> str:
    """Integers as they are, other numbers to `digits` significant digits; "—" for no number."""
    n = number(value)
    if n is None:
        return "—"
    if n == int(n) and abs(n) < 1e15:
        return str(int(n))
    return f"{n:.{digits}g}"


@dataclass
class RecipeItem:
    """One row of the recipe: `key` names the result field it shows, `value` is that field's value."""

    key: str
    label: str
    text: str
    value: Any
    hint: str = ""


def recipe_items(result: Mapping[str, Any], *, details: bool = False) -> list[RecipeItem]:
    """The recipe's rows, in reading order, for the fields the result has. `details` adds what the
    estimates came from (peak throughput, memory model, where it was measured), as the CLI shows it."""

    def item(key: str, label: str, hint: str = "") -> RecipeItem | None:
        if result.get(key) is None:
            return None
        return RecipeItem(key, label, format_number(result[key]), result[key], hint)

    micro, accumulation, devices = (
        result.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps", "devices")
    )
    layout = " × ".join(
        f"{format_number(v)} {unit if v == 1 or unit.startswith('per') else unit + 's'}"
        for v, unit in ((micro, "per device"), (devices, "device"), (accumulation, "accumulation step"))
        if number(v) is not None
    )
    items = [
        item("recommended_batch_size", "Global batch size", hint=layout),
        item("micro_batch_size", "Micro-batch per device"),
        item("gradient_accumulation_steps", "Gradient accumulation steps"),
        item("devices", "Devices"),
        item("learning_rate", "Learning rate", hint=str(result.get("learning_rate_rule") or "")),
        item("warmup_steps", "Warm-up steps"),
        item("steps_per_epoch", "Steps per epoch"),
        item("max_feasible_batch_size", "Largest batch that fits (verified)"),
        item("max_feasible_batch_size_aligned", "Largest multiple of 8 that fits"),
    ]
    noise = as_dict(result.get("gradient_noise_scale"))
    if number(noise.get("value")) is not None:
        spread = ""
        if number(noise.get("low")) is not None and number(noise.get("high")) is not None:
            spread = f"{format_number(noise['low'], 3)}–{format_number(noise['high'], 3)}"
        on = f", measured on {noise['measured_on']}" if noise.get("measured_on") else ""
        text, label = format_number(noise["value"], 3), "Gradient noise scale B_noise"
        items.append(RecipeItem("gradient_noise_scale", label, text, noise["value"], spread + on))
    if details:
        items += _details(result)
    if result.get("confidence") is not None:
        items.append(RecipeItem("confidence", "Confidence", str(result["confidence"]), result["confidence"]))
    if result.get("extrapolated") is not None:
        extrapolated = bool(result["extrapolated"])
        text = "yes" if extrapolated else "no"
        items.append(RecipeItem("extrapolated", "Extrapolated to the target device", text, extrapolated))
    return [i for i in items if i is not None]


def _details(result: Mapping[str, Any]) -> list[RecipeItem]:
    """Where the recipe's numbers come from: the throughput peak, the memory model, the device."""
    items = []
    throughput = [p for p in result.get("throughput") or [] if number(as_dict(p).get("samples_per_second"))]
    if throughput:
        best = max(throughput, key=lambda p: p["samples_per_second"])
        rate, size = format_number(best["samples_per_second"]), format_number(best.get("batch_size"))
        text = f"{rate} samples/s at batch {size}"
        items.append(RecipeItem("throughput", "Peak throughput", text, best))
    memory = as_dict(result.get("memory"))
    if memory:
        fixed, per_sample, budget = (
            format_bytes(memory.get(k)) for k in ("fixed_bytes", "per_sample_bytes", "budget_bytes")
        )
        text = f"fixed {fixed} + {per_sample}/sample, budget {budget}"
        items.append(RecipeItem("memory", "Memory model", text, memory))
    device = as_dict(result.get("device"))
    if device:
        text = f"{device.get('type')} {device.get('name') or ''}".strip()
        items.append(RecipeItem("device", "Measured on", text, device))
    return items
