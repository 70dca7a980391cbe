"""In-process probes, without a server: `batchsize recommend --local` and `batchsize_client.recommend(...,
local=True)`. Imports torch, `models` and the probe engine only (no web stack)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.probing.spec import ProbeError, ProbeSpec, build_probe_spec


def local_probe_spec(
    model: str | None,
    zoo_config: dict | None,
    model_file: Path | None,
    declared: dict,
    sample_file: Path | None,
    settings: dict,
) -> ProbeSpec:
    """The ProbeSpec for an in-process run (the same fields the worker builds from a stored request).

    `declared`: an exported model's loss/input/target/num_classes; `settings`: dataset_size, optimizer,
    learning_rate, reference_batch_size, precision, gradient_checkpointing, device, memory_budget_bytes,
    objective, time_budget_s.
    """
    import torch

    if model_file is not None:
        from service.probing.exported import ArchiveError, dry_run

        try:
            config = dry_run(str(model_file), {k: v for k, v in declared.items() if v is not None})["config"]
        except ArchiveError as exc:
            raise ProbeError(exc.code, exc.message) from None
        name, artifact_path = f"file:{Path(model_file).name}", str(Path(model_file).resolve())
    else:
        from models import config_to_dict, get_model, make_config

        try:
            spec = get_model(str(model))
            config = config_to_dict(make_config(spec, zoo_config or {}))
        except KeyError as exc:
            raise ProbeError("unknown_model", str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise ProbeError("invalid_config", f"--config: {exc}") from None
        name, artifact_path = str(model), None
    target = settings.get("device") or {}
    return build_probe_spec(
        model_name=name,
        model_config=config,
        model_artifact_path=artifact_path,
        training=settings,
        device="cuda" if torch.cuda.is_available() else "cpu",
        memory_budget_bytes=settings.get("memory_budget_bytes"),
        time_budget_s=settings["time_budget_s"],
        objective=settings["objective"],
        dataset_size=settings["dataset_size"],
        device_count=int(target.get("count") or 1),
        target_device=target if target.get("type") or target.get("memory_bytes") else None,
        sample_path=str(sample_file) if sample_file else None,
    )


def run_local(spec: ProbeSpec, emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the probe in this process; the result dict (raises ProbeError with its code on failure)."""
    from service.probing.engine import run_probe

    return dict(run_probe(spec, emit or (lambda _event: None)))
