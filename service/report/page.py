"""The report page's context and the index page's rows, from the API's public dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from service.recipe_text import RecipeItem, as_dict, format_bytes, format_number, number, recipe_items
from service.report.plots import memory_plot, noise_plot, safe, throughput_plot, time_plot
from service.status import ACTIVE

REFRESH_SECONDS = 2


@dataclass
class Report:
    recommendation: dict[str, Any]
    recipe: list[RecipeItem]
    request_summary: list[tuple[str, str]]
    plots: list[Markup]
    trials: list[dict[str, Any]]
    warnings: list[str]
    refresh_seconds: int | None
    progress_percent: int | None


def _request_summary(request: dict[str, Any], result: dict[str, Any]) -> list[tuple[str, str]]:
    model, training, dataset = (as_dict(request.get(k)) for k in ("model", "training", "dataset"))
    target = as_dict(request.get("device"))
    device = as_dict(result.get("device")) or target
    optimizer = (
        f"{training.get('optimizer', '—')}, lr {format_number(training.get('learning_rate'))} "
        f"at batch {format_number(training.get('reference_batch_size'))}"
    )
    precision = str(training.get("precision", "—"))
    if training.get("gradient_checkpointing"):
        precision += ", gradient checkpointing"
    budget = request.get("memory_budget_bytes")
    described = " ".join(str(v) for v in (device.get("type"), device.get("name")) if v) or "—"
    if device.get("memory_bytes"):
        described += f" ({format_bytes(device['memory_bytes'])})"
    count = number(target.get("count"))
    if count and count > 1:
        described += f" × {format_number(count)}"
    return [
        ("Model", str(model.get("name") or f"artifact {model.get('artifact_id')}")),
        ("Dataset size", format_number(dataset.get("size"))),
        ("Optimizer", optimizer),
        ("Precision", precision),
        ("Objective", str(request.get("objective", "—"))),
        ("Memory budget", format_bytes(budget) if budget else "the device's free memory"),
        ("Device", described),
    ]


def _trial_row(trial: Mapping[str, Any]) -> dict[str, Any]:
    detail = ""
    if trial.get("detail"):
        detail = json.dumps(trial["detail"], separators=(", ", ": "), default=str)
        detail = detail if len(detail) <= 160 else detail[:157] + "…"
    step_time = number(trial.get("step_time_s"))
    return {
        "index": trial.get("index"),
        "phase": trial.get("phase"),
        "batch_size": format_number(trial.get("batch_size")),
        "outcome": trial.get("outcome"),
        "peak": format_bytes(trial.get("peak_bytes")),
        "step_time": f"{step_time * 1000:.3g} ms" if step_time is not None else "—",
        "throughput": format_number(trial.get("samples_per_second"), 4),
        "detail": detail,
    }


def _warning_text(warning: Any) -> str:
    if isinstance(warning, dict):
        return str(warning.get("message") or json.dumps(warning, default=str))
    return str(warning)


def build_report(public: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> Report:
    """Everything report.html shows. `public` is a job as the API shows it (RecommendationOut),
    `trials` its trials (TrialOut)."""
    result = as_dict(public.get("result"))
    request = as_dict(public.get("request"))
    budget = number(request.get("memory_budget_bytes"))
    plots = [
        safe(lambda: memory_plot(result, trials, budget), name="memory", title="Peak memory vs batch size"),
        safe(lambda: throughput_plot(result, trials), name="throughput", title="Throughput vs batch size"),
        safe(lambda: time_plot(result), name="time_to_target", title="Predicted time to target"),
        safe(lambda: noise_plot(result), name="noise_scale", title="Gradient noise scale"),
    ]
    active = public.get("status") in ACTIVE
    progress = as_dict(public.get("progress"))
    done, planned = number(progress.get("trials_done")) or 0, number(progress.get("trials_planned")) or 0
    percent = min(100, round(100 * done / planned)) if active and planned else None
    warnings = result.get("warnings")
    warnings = warnings if isinstance(warnings, list) else []
    return Report(
        recommendation=dict(public),
        recipe=recipe_items(result),
        request_summary=_request_summary(request, result),
        plots=plots,
        trials=[_trial_row(t) for t in trials],
        warnings=[_warning_text(w) for w in warnings],
        refresh_seconds=REFRESH_SECONDS if active else None,
        progress_percent=percent,
    )


def index_row(public: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the index page's table of recent recommendations."""
    result = as_dict(public.get("result"))
    request = as_dict(public.get("request"))
    model = as_dict(request.get("model"))
    progress = as_dict(public.get("progress"))
    return {
        "id": public["id"],
        "status": public["status"],
        "model": model.get("name") or f"artifact {model.get('artifact_id')}",
        "dataset_size": format_number(as_dict(request.get("dataset")).get("size")),
        "objective": request.get("objective", ""),
        "recommended": format_number(result.get("recommended_batch_size")),
        "max_feasible": format_number(result.get("max_feasible_batch_size")),
        "progress": "{} {}/{}".format(
            progress.get("phase") or "", progress.get("trials_done", 0), progress.get("trials_planned", 0)
        ),
        "created_at": public["created_at"].strftime("%Y-%m-%d %H:%M:%S UTC")
        if public.get("created_at")
        else "",
    }
