"""The report's plots drawn from a result and its trials (public dicts), without the app."""

from __future__ import annotations

import re

from service.report.plots import memory_plot
from tests.ui import seed

MIB = 2**20


def _y_ticks(svg: str) -> list[str]:
    return re.findall(r'text-anchor="end" font-size="11">([^<]+)</text>', svg)


def test_memory_plot_is_linear_when_the_peaks_use_the_budget() -> None:
    svg = memory_plot(seed.result(), seed.memory_trials(), None)
    assert "peak memory (log2)" not in svg
    assert _y_ticks(svg)[0] == "0"


def test_memory_plot_turns_log2_when_the_model_is_tiny_against_the_budget() -> None:
    tiny = {"fixed_bytes": 40_000, "per_sample_bytes": 300, "optimizer_peak_bytes": 50_000}
    result = seed.result(memory={**tiny, "budget_bytes": 64 * 2**30}, max_feasible_batch_size=4096)
    trials = [
        {"phase": "memory", "batch_size": b, "outcome": "ok", "peak_bytes": 40_000 + 300 * b}
        for b in (8, 512, 4096)
    ]
    svg = memory_plot(result, trials, None)
    assert "peak memory (log2)" in svg
    ticks = _y_ticks(svg)
    assert "0" not in ticks and ticks[0].endswith("KiB") and ticks[-1].endswith("GiB")
    assert "budget 64 GiB" in svg
    assert svg.count('class="point"') == 3  # every measured peak is drawn, none on the floor


def test_a_diverged_race_is_not_drawn_as_a_memory_failure() -> None:
    trials = [
        *seed.memory_trials(),
        {"phase": "race", "batch_size": 512, "outcome": "error", "peak_bytes": None,
         "detail": {"status": "diverged"}},
        {"phase": "noise", "batch_size": 256, "outcome": "error", "peak_bytes": None},
    ]  # fmt: skip
    svg = memory_plot(seed.result(), trials, None)
    assert "failed (OOM / error)" not in svg
    failed = [{"phase": "memory", "batch_size": 4096, "outcome": "oom", "peak_bytes": None}]
    assert "failed (OOM / error)" in memory_plot(seed.result(), [*seed.memory_trials(), *failed], None)
