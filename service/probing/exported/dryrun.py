"""The dry run of an uploaded archive: load it, infer its training task, train at batch sizes 2, 3 and 1;
and the check of a data sample against an uploaded model (`check_sample`: one training step on a slice).

`main` is the entry point of `python -m service.probing.exported` (through `__main__.py`), which the
service runs in a sandboxed subprocess: a JSON request on stdin (`{"path", "declared"}` for a dry run,
`{"mode": "sample", "path", "config", "sample_path", "ignore_index"}` for a sample check), JSON lines
out (`{"event": "result", ...}` or `{"event": "error", ...}`): `service.probing.protocol`, as the runner.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from typing import Any

import torch

from service.probing.exported.adapt import describe_program, infer_config, model_spec_for, step_failed
from service.probing.exported.archive import ArchiveError
from service.probing.exported.loader import load_program
from service.probing.protocol import emitter, error_message, open_stream, result_message
from service.probing.spec import ProbeError

DRY_RUN_BATCH_SIZES = (2, 3, 1)  # 2 and 3: the batch dimension is dynamic; 1: where the probe starts


def dry_run(path: str, declared: dict[str, Any]) -> dict[str, Any]:
    """Load the archive, infer its training task, and run real training steps at batch sizes 2, 3, 1.

    Returns {"config", "parameters", "parameter_bytes", "trainable_parameter_bytes", "losses",
    "inputs", "batch"}; raises ArchiveError with a client-facing message on any problem.
    """
    from service.probing.step import TrainingStep

    try:
        program = load_program(path)
    except ArchiveError:
        raise
    except Exception as exc:
        raise ArchiveError(
            "not_an_export_archive", f"the archive cannot be loaded as a torch.export program: {exc}"
        ) from exc
    config = infer_config(program, declared)
    spec = model_spec_for(path, config)
    try:
        step = TrainingStep(spec, config, optimizer="sgd", learning_rate=1e-3, device="cpu", seed=0)
    except ProbeError as exc:
        raise ArchiveError("dry_run_failed", exc.message) from exc
    losses: dict[str, float] = {}
    for batch_size in DRY_RUN_BATCH_SIZES:
        try:
            loss = float(step.run(batch_size))
        except Exception as exc:
            step.discard_gradients()
            text = str(exc)
            if batch_size == 3 and ("[0]" in text or "shape[0]" in text or "size()[0]" in text):
                raise ArchiveError(
                    "static_batch_dimension",
                    f"the batch dimension is static: batch size 2 trains but 3 fails ({type(exc).__name__}: "
                    f"{text[:300]}). Export with dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}}",
                ) from exc
            raise step_failed(batch_size, exc) from exc
        if not math.isfinite(loss):
            raise ArchiveError(
                "dry_run_failed", f"the loss is {loss} at a training step at batch size {batch_size}"
            )
        losses[str(batch_size)] = loss
    model = step.model
    described = describe_program(program)
    return {
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": step.state_bytes_estimate["parameters"],
        "trainable_parameter_bytes": step.state_bytes_estimate["gradients"],
        "losses": losses,
        "inputs": described["inputs"],
        "batch": described["batch"],
        "torch": torch.__version__,
    }


def check_sample(
    path: str, config: dict[str, Any], sample_path: str, ignore_index: int = -100
) -> dict[str, Any]:
    """Load the sample against the uploaded model's stored config (every array checked, as the probe
    does at its start) and run one forward, loss and backward on its first rows (`sample_check.dry_step`).

    Returns {"examples"}; raises ArchiveError `sample_mismatch` with the reason when the model cannot
    train on it, or another code when the model itself cannot be loaded (not the sample's fault).
    """
    from service.probing import sample_check
    from service.probing.data import load_client_sample
    from service.probing.exported.adapt import ExportedConfig

    try:
        exported = ExportedConfig.from_dict({**config, "ignore_index": ignore_index})
    except (TypeError, ValueError) as exc:
        raise ArchiveError("invalid_config", f"invalid config for the uploaded model: {exc}") from exc
    spec = model_spec_for(path, exported)
    task = sample_check.Task.for_model(
        exported, input_shape=list(exported.input_shape), input_dtype=exported.input_dtype, num_classes=0
    )
    try:
        sample = load_client_sample(
            sample_path, list(exported.input_shape), exported.input_dtype, 0, task=task
        )
    except ValueError as exc:
        raise ArchiveError("sample_mismatch", str(exc)) from exc
    torch.manual_seed(0)
    model = spec.build(exported, False)
    try:
        sample_check.dry_step(model, spec.loss, sample.x, sample.y, task)
    except ValueError as exc:
        raise ArchiveError("sample_mismatch", str(exc)) from exc
    return {"examples": len(sample)}


# --------------------------------------------------------------------------------------------------
# Entry point: python -m service.probing.exported


def main() -> int:
    emit = emitter(open_stream())
    try:
        request = json.loads(sys.stdin.read())
        if request.get("mode") == "sample":
            result = check_sample(
                str(request["path"]),
                dict(request["config"]),
                str(request["sample_path"]),
                int(request.get("ignore_index", -100)),
            )
        else:
            result = dry_run(str(request["path"]), dict(request.get("declared") or {}))
        emit(result_message(result))
    except ArchiveError as exc:
        emit(error_message(exc.code, exc.message))
    except Exception as exc:
        traceback.print_exc()
        emit(error_message("dry_run_failed", f"{type(exc).__name__}: {exc}"))
    return 0
