"""Uploaded artifacts: exported models (`.pt2`) and data samples (`.npz`, `.safetensors`).

Every upload is copied to disk while it is hashed (size limit enforced as it streams), checked, and
stored by content hash under `data_dir/artifacts/<sha256><suffix>`: the same file twice is one artifact.

Models are checked in two steps, and no uploaded byte is ever unpickled in this process:
1. `service.probing.exported.inspect_archive` reads the zip with `zipfile`/`json` only: the layout, and
   no pickled weight, constant or object (`"use_pickle": true`, legacy `*.pt`, custom objects).
2. A dry run in a subprocess (`python -m service.probing.exported`, JSON over a pipe): it loads the
   program without pickle, infers the training task (input, targets) from the program and the client's
   declaration, and trains real steps at batch sizes 2, 3 and 1 (the batch dimension must be dynamic).

Samples are read here by `service.probing.data`'s readers (no numpy loader, no pickle; `.npy` headers
first, refused by declared size before anything is decompressed) and must be readable, numeric,
finite and non-empty; whether they fit a model is checked when a recommendation names both.

Every zip is opened through `service.probing.untrusted` (end record checked before the directory is
parsed, members read in bounded chunks). Uploads are checked on a small thread pool of their own
(`settings.artifact_check_concurrency`), never on the event loop or the request thread pool, so a
burst of uploads queues without stalling other requests. The dry run's process is sandboxed by
`service.probing.sandbox.sandboxed_module` (resource limits, private TMPDIR, no secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import repository
from service.config import Settings
from service.db.models import Artifact
from service.db.session import session_scope
from service.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, ServiceError
from service.probing.protocol import RESULT, final_message  # torch-free
from service.probing.sandbox import SandboxLimits, kill_group, sandboxed_module  # torch-free
from service.probing.spec import ProbeError  # torch-free

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".pt2"
SAMPLE_SUFFIXES = (".npz", ".safetensors")
CHUNK_BYTES = 1024 * 1024
DRY_RUN_NICENESS = 10
# Upload checks (hashing, parsing, dry runs) run on pools of their own, made on first use, one per
# concurrency setting: a queue that never occupies the event loop or the request thread pool.
_CHECK_POOLS: dict[int, ThreadPoolExecutor] = {}
_CHECK_POOLS_LOCK = threading.Lock()
LOSSES = ("cross_entropy", "mse", "l1", "huber", "model_returns_loss")


class ArtifactRejected(InvalidRequest):
    """An upload that is not an acceptable artifact (422; the code names the problem)."""

    code = "invalid_artifact"


@dataclass
class StagedFile:
    path: Path
    sha256: str
    size_bytes: int


def artifacts_dir(settings: Settings) -> Path:
    return (settings.data_dir / "artifacts").resolve()


# --------------------------------------------------------------------------------------------------
# Use cases


def upload(
    reads: sessionmaker[Session],
    writes: sessionmaker[Session],
    *,
    settings: Settings,
    kind: str,
    stream: IO[bytes],
    filename: str,
    declared: dict[str, Any] | None = None,
) -> tuple[Artifact, bool]:
    """Check and store one upload. Returns (artifact, created); created is False for a known file.

    No session is held while the file is checked: a dry run takes seconds.
    """
    declared = normalise_declaration(declared or {}) if kind == "model" else {}
    staged = stage(stream, settings=settings)
    try:
        with session_scope(reads) as session:
            existing = repository.get_artifact(session, staged.sha256)
        if existing is not None:
            _check_same_upload(existing, kind=kind, declared=declared)
            _restore_file(existing, staged)
            return existing, False
        if kind == "model":
            meta, suffix = check_model(staged.path, declared, settings=settings), MODEL_SUFFIX
        else:
            meta, suffix = check_sample(staged.path, filename)
        final = artifacts_dir(settings) / f"{staged.sha256}{suffix}"
        os.replace(staged.path, final)
        try:
            with session_scope(writes) as session:
                artifact = repository.add_artifact(
                    session,
                    artifact_id=staged.sha256,
                    kind=kind,
                    filename=_clean_filename(filename),
                    size_bytes=staged.size_bytes,
                    path=str(final),
                    meta=meta,
                )
        except IntegrityError:  # the same file, uploaded concurrently, was stored first
            with session_scope(reads) as session:
                existing = repository.get_artifact(session, staged.sha256)
            if existing is None:
                raise
            _check_same_upload(existing, kind=kind, declared=declared)
            return existing, False
        log.info("stored %s artifact %s (%d bytes)", kind, staged.sha256, staged.size_bytes)
        return artifact, True
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.path.unlink()


async def upload_queued(
    reads: sessionmaker[Session],
    writes: sessionmaker[Session],
    *,
    settings: Settings,
    kind: str,
    stream: IO[bytes],
    filename: str,
    declared: dict[str, Any] | None = None,
) -> tuple[Artifact, bool]:
    """`upload` on the check pool: at most `settings.artifact_check_concurrency` run at once, the rest
    wait in its queue; the caller's event loop stays free meanwhile."""
    work = functools.partial(
        upload,
        reads,
        writes,
        settings=settings,
        kind=kind,
        stream=stream,
        filename=filename,
        declared=declared,
    )
    return await asyncio.get_running_loop().run_in_executor(_check_pool(settings), work)


def _check_pool(settings: Settings) -> ThreadPoolExecutor:
    size = settings.artifact_check_concurrency
    with _CHECK_POOLS_LOCK:
        pool = _CHECK_POOLS.get(size)
        if pool is None:
            pool = _CHECK_POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="artifact-check")
        return pool


def get(session: Session, artifact_id: str) -> Artifact:
    artifact = repository.get_artifact(session, artifact_id)
    if artifact is None:
        raise NotFound(f"artifact {artifact_id!r} does not exist")
    return artifact


def delete(session: Session, artifact_id: str) -> None:
    """Delete the artifact's row and file. Jobs that still name it fail with a clear reason."""
    artifact = get(session, artifact_id)
    path = Path(artifact.path)
    repository.delete_artifact(session, artifact_id)
    session.flush()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def to_public(artifact: Artifact) -> dict[str, Any]:
    return {
        "id": artifact.id,
        "kind": artifact.kind,
        "filename": artifact.filename,
        "size_bytes": artifact.size_bytes,
        "meta": artifact.meta or {},
        "created_at": artifact.created_at,
    }


# --------------------------------------------------------------------------------------------------
# Staging: copy while hashing, enforce the size limit as the bytes arrive


def stage(stream: IO[bytes], *, settings: Settings) -> StagedFile:
    limit = settings.max_upload_bytes
    incoming = artifacts_dir(settings) / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    handle, name = tempfile.mkstemp(dir=incoming)
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := stream.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"the upload is over this service's limit of {limit} bytes "
                        "(BATCHSIZE_MAX_UPLOAD_BYTES)",
                        code="upload_too_large",
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise ArtifactRejected("the uploaded file is empty", code="empty_file")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return StagedFile(path=path, sha256=digest.hexdigest(), size_bytes=size)


def _restore_file(existing: Artifact, staged: StagedFile) -> None:
    """A known artifact whose file went missing gets it back from the identical upload."""
    target = Path(existing.path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)


def _check_same_upload(existing: Artifact, *, kind: str, declared: dict[str, Any]) -> None:
    if existing.kind != kind:
        raise Conflict(
            f"this file is already stored as a {existing.kind} artifact ({existing.id})",
            code="artifact_conflict",
        )
    before = (existing.meta or {}).get("declared", {})
    if kind == "model" and before != declared:
        raise Conflict(
            f"this model is already stored as artifact {existing.id} with a different declaration "
            f"({json.dumps(before, sort_keys=True)}); delete it first to upload it with "
            f"{json.dumps(declared, sort_keys=True)}",
            code="artifact_conflict",
            details={"id": existing.id, "declared": before},
        )


def _clean_filename(filename: str) -> str:
    name = Path(filename or "upload").name
    return "".join(c if c.isprintable() else "_" for c in name)[:255] or "upload"


# --------------------------------------------------------------------------------------------------
# Models


def normalise_declaration(fields: dict[str, Any]) -> dict[str, Any]:
    """The client's declaration of the training task: loss, input/target specs, num_classes."""
    loss = fields.get("loss")
    if loss not in LOSSES:
        raise ArtifactRejected(
            f"a model upload needs the form field loss: one of {', '.join(LOSSES)} (got {loss!r})",
            code="invalid_model_spec",
        )
    declared: dict[str, Any] = {"loss": loss}
    for key in ("input", "target"):
        value = fields.get(key)
        if value in (None, ""):
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ArtifactRejected(f"{key} is not valid JSON: {exc}", code="invalid_model_spec") from None
        if not isinstance(value, dict) or set(value) - {"shape", "dtype", "high"}:
            raise ArtifactRejected(
                f'{key} must be a JSON object with "shape" (per-sample, without the batch dimension), '
                f'"dtype" and "high" (exclusive bound of integer values), e.g. {{"shape": [3, 32, 32]}}',
                code="invalid_model_spec",
            )
        declared[key] = {k: v for k, v in value.items() if v is not None}
    num_classes = fields.get("num_classes")
    if num_classes is not None:
        declared["num_classes"] = num_classes
    return declared


def check_model(path: Path, declared: dict[str, Any], *, settings: Settings) -> dict[str, Any]:
    """Inspect the archive (zipfile only), then dry-run it in a subprocess. Returns the artifact's meta."""
    from service.probing.exported import ArchiveError, inspect_archive

    try:
        layout = inspect_archive(path, max_uncompressed_bytes=2 * settings.max_upload_bytes)
    except ArchiveError as exc:
        if exc.code == "archive_too_large":
            raise PayloadTooLarge(exc.message, code=exc.code) from None
        raise ArtifactRejected(exc.message, code=exc.code) from None
    result = run_dry_run(
        path,
        declared,
        timeout_s=settings.artifact_dry_run_timeout_s,
        limits=SandboxLimits.from_settings(settings),
    )
    return {"declared": declared, "archive": layout, **result}


@dataclass(frozen=True)
class ChildOutcome:
    """What a run of the exported model's child process left: its final protocol line, if any."""

    final: dict[str, Any] | None
    returncode: int | None
    stderr_tail: list[str]


class ChildTimeout(Exception):
    """The child gave no verdict in time; its process group has been killed."""


def run_exported_child(
    request: dict[str, Any],
    *,
    timeout_s: float,
    limits: SandboxLimits | None,
    niceness: int = DRY_RUN_NICENESS,
) -> ChildOutcome:
    """`python -m service.probing.exported` (a dry run or a sample check) with `request` as JSON on stdin:
    on the CPU (the GPU is left to the probes), at low priority (it must not starve the API), sandboxed in
    its own process group. Raises ChildTimeout, and ProbeError when the sandbox could not be set up."""
    with tempfile.TemporaryFile() as stderr:
        with sandboxed_module(
            "service.probing.exported", stderr, {"CUDA_VISIBLE_DEVICES": ""}, limits=limits, niceness=niceness
        ) as process:
            try:
                output, _ = process.communicate(json.dumps(request).encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(process)
                raise ChildTimeout from None
        stderr.seek(0)
        tail = stderr.read().decode("utf-8", "replace").strip().splitlines()[-5:]
    return ChildOutcome(final_message(output.splitlines()), process.returncode, tail)


def run_dry_run(
    path: Path, declared: dict[str, Any], *, timeout_s: float, limits: SandboxLimits | None = None
) -> dict[str, Any]:
    """The upload's dry run: the model's training task, or ArtifactRejected saying why it has none."""
    try:
        outcome = run_exported_child(
            {"path": str(path), "declared": declared}, timeout_s=timeout_s, limits=limits
        )
    except ChildTimeout:
        raise ArtifactRejected(
            f"the dry run (one training step at batch sizes 2, 3 and 1 on the CPU) did not finish within "
            f"{timeout_s:g} s",
            code="dry_run_timeout",
        ) from None
    except ProbeError as exc:  # the sandbox could not be set up: a fault of this host, not the upload
        raise ServiceError(exc.message, code=exc.code) from exc
    final = outcome.final
    if final is not None and final["event"] == RESULT:
        return dict(final["result"])
    if final is not None:
        raise ArtifactRejected(str(final.get("message", "")), code=str(final.get("code", "dry_run_failed")))
    raise ArtifactRejected(
        f"the dry run of the model crashed (exit status {outcome.returncode}): "
        + " | ".join(outcome.stderr_tail),
        code="dry_run_failed",
    )


# --------------------------------------------------------------------------------------------------
# Samples


def check_sample(path: Path, filename: str) -> tuple[dict[str, Any], str]:
    """Read x and y without unpickling and check they make a sample (`sample_check.check_arrays`):
    numeric, finite, non-empty. Returns (meta, suffix); meta describes the arrays, so that a
    recommendation can check them against a model without reading the file again."""
    import zipfile

    from service.probing import sample_check
    from service.probing.data import read_npz, read_safetensors

    suffix = Path(filename or "").suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        suffix = ".npz" if zipfile.is_zipfile(path) else ".safetensors"
    try:
        arrays = read_npz(path) if suffix == ".npz" else read_safetensors(path.read_bytes())
        description = sample_check.check_arrays(arrays)
    except ValueError as exc:
        raise ArtifactRejected(str(exc), code="invalid_sample") from None
    return {"format": suffix.lstrip("."), **description}, suffix


def list_public(session: Session, *, kind: str | None = None) -> list[dict[str, Any]]:
    """Uploaded artifacts, newest first, as the API shows them."""
    return [to_public(a) for a in repository.list_artifacts(session, kind=kind)]
