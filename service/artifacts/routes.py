"""/v1/artifacts: upload exported models and data samples; thin handlers over service.artifacts.service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile, status
from pydantic import BaseModel, Field

from service.api.deps import ReadSession, State, WriteSession
from service.artifacts import service as use_cases
from service.errors import error_responses
from service.security import check_form_json

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

ArtifactId = Annotated[
    str, Path(min_length=1, max_length=64, description="The artifact's id: the sha256 of its content.")
]
Kind = Literal["model", "sample"]


class ArtifactOut(BaseModel):
    id: str = Field(description="sha256 of the file: the same file uploaded twice is one artifact.")
    kind: Kind
    filename: str
    size_bytes: int
    meta: dict[str, Any] = Field(
        description=(
            "Models: the declaration, the inferred training task (`config`: input/target shapes, dtypes, "
            "loss), parameter counts, the batch range and the dry run's losses. Samples: format, "
            "examples, x/y per-example shapes and dtypes."
        )
    )
    created_at: datetime


UPLOAD_DESCRIPTION = """
Multipart form: `file` and `kind`.

**kind=model**: a `torch.export` archive (`.pt2`) exported in train mode with a dynamic batch dimension:

```python
program = torch.export.export(model.train(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
torch.export.save(program, "model.pt2")
```

Form fields: `loss` (`cross_entropy`: the model returns logits `[batch, ..., classes]`; `mse`, `l1`,
`huber` (delta 1): targets are shaped like the output; `model_returns_loss`: `forward(x, target)`
returns the loss), and optionally
`input` / `target` (JSON: per-sample `shape`, `dtype`, `high` = exclusive bound of integer values such as
token ids; needed only where the program cannot tell, e.g. dynamic sequence lengths) and `num_classes`.

The archive is inspected as a zip (weights or objects stored as pickles are refused: nothing uploaded is
ever unpickled; symbolic-shape expressions, operator names and every other string in the program are
checked so that nothing in it is ever evaluated: `unsafe_archive_content`), then trained for one step
at batch sizes 2, 3 and 1 on the CPU in a separate, resource-limited process. Uploads are checked a
few at a time; the rest wait in a queue.

**kind=sample**: an `.npz` (loaded without pickle) or `.safetensors` file with arrays `x` (inputs,
`[N, ...]`) and `y` (integer labels `[N]` or `[N, ...]`), used for the gradient noise scale.

Answers `201` with a new artifact, `200` with the stored one when the same file was uploaded before.
"""


@router.post(
    "",
    response_model=ArtifactOut,
    status_code=status.HTTP_201_CREATED,
    summary="Upload an exported model (.pt2) or a data sample (.npz / .safetensors)",
    description=UPLOAD_DESCRIPTION,
    responses={
        200: {"model": ArtifactOut, "description": "The same file was uploaded before: the stored artifact."},
        **error_responses(401, 409, 413, 422),
    },
)
async def upload_artifact(
    state: State,
    response: Response,
    file: Annotated[UploadFile, File(description="The .pt2 archive or the data sample.")],
    kind: Annotated[Kind, Form(description="model or sample")],
    loss: Annotated[
        Literal["cross_entropy", "mse", "l1", "huber", "model_returns_loss"] | None,
        Form(description="Models only."),
    ] = None,
    input: Annotated[
        str | None,
        Form(
            max_length=4096,
            description='Models only. JSON, e.g. {"shape": [128], "dtype": "int64", "high": 50257}',
        ),
    ] = None,
    target: Annotated[
        str | None,
        Form(max_length=4096, description="Models with loss=model_returns_loss: JSON like `input`."),
    ] = None,
    num_classes: Annotated[int | None, Form(gt=0, le=10**9, description="Models only (optional).")] = None,
) -> dict:
    check_form_json(input=input, target=target)
    declared = {"loss": loss, "input": input, "target": target, "num_classes": num_classes}
    # Checked on the artifact-check pool (bounded, queued): this event loop stays free meanwhile.
    artifact, created = await use_cases.upload_queued(
        state.reads,
        state.writes,
        settings=state.settings,
        kind=kind,
        stream=file.file,
        filename=file.filename or "upload",
        declared=declared,
    )
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/artifacts/{artifact.id}"
    return use_cases.to_public(artifact)


@router.get(
    "",
    response_model=list[ArtifactOut],
    summary="List uploaded artifacts, newest first",
    responses=error_responses(401, 422),
)
def list_artifacts(session: ReadSession, kind: Annotated[Kind | None, Query()] = None) -> list[dict]:
    return use_cases.list_public(session, kind=kind)


@router.get(
    "/{artifact_id}",
    response_model=ArtifactOut,
    summary="Get an uploaded artifact",
    responses=error_responses(401, 404, 422),
)
def get_artifact(artifact_id: ArtifactId, session: ReadSession) -> dict:
    return use_cases.to_public(use_cases.get(session, artifact_id))


@router.delete(
    "/{artifact_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an uploaded artifact and its file",
    description="Recommendations already stored keep their results; queued ones that name it will fail.",
    responses=error_responses(401, 404, 422),
)
def delete_artifact(artifact_id: ArtifactId, session: WriteSession) -> Response:
    use_cases.delete(session, artifact_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
