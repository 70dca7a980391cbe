"""Bring your own model: a `torch.export` archive (`.pt2`) trained by the probe like a zoo model.

The client exports its model in train mode with a dynamic batch dimension and saves it::

    batch = torch.export.Dim("batch")
    program = torch.export.export(model.train(), (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, "model.pt2")

Modules:
    archive   inspect_archive: the zip and its JSON checked with `zipfile`/`json` only (no torch); what
              the service process runs on an upload before anything else
    loader    load_program: the inspected archive rebuilt without pickle (probe subprocess only); the
              private torch APIs this needs sit behind one function (`unsupported_torch` on a mismatch)
    adapt     ExportedConfig, infer_config, the losses, model_spec_for / resolve_exported (the probe
              engine's ModelSpec for an uploaded model)
    dryrun    dry_run: load, infer the training task, train at batch sizes 2, 3 and 1; check_sample: a
              data sample against an uploaded model (one step on a slice); `main` is
              `python -m service.probing.exported` (JSON in on stdin, JSON lines out)

Only `archive` is imported with this package: the torch-backed names below load their module on first
use, so `from service.probing.exported import inspect_archive` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from service.probing.exported.archive import (
    ArchiveError,
    check_program_json,
    check_sympy_expression,
    inspect_archive,
)

if TYPE_CHECKING:
    from service.probing.exported.adapt import (
        DTYPES,
        LOSSES,
        ExportedConfig,
        ExportedModule,
        describe_program,
        infer_config,
        model_spec_for,
        resolve_exported,
    )
    from service.probing.exported.dryrun import check_sample, dry_run
    from service.probing.exported.loader import load_program

_LAZY = {
    "DTYPES": "adapt",
    "LOSSES": "adapt",
    "ExportedConfig": "adapt",
    "ExportedModule": "adapt",
    "describe_program": "adapt",
    "infer_config": "adapt",
    "model_spec_for": "adapt",
    "resolve_exported": "adapt",
    "check_sample": "dryrun",
    "dry_run": "dryrun",
    "load_program": "loader",
}

__all__ = [
    "DTYPES",
    "LOSSES",
    "ArchiveError",
    "ExportedConfig",
    "ExportedModule",
    "check_program_json",
    "check_sample",
    "check_sympy_expression",
    "describe_program",
    "dry_run",
    "infer_config",
    "inspect_archive",
    "load_program",
    "model_spec_for",
    "resolve_exported",
]


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported from their module when first asked for (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
