"""/v1/workers: the workers sharing this database and the devices they probe on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service import fleet
from service.api.deps import ReadSession, State
from service.errors import error_responses
from service.schemas import WorkerOut

router = APIRouter(prefix="/v1", tags=["workers"])


@router.get(
    "/workers",
    response_model=list[WorkerOut],
    summary="Registered workers, their devices and whether they are alive",
    responses=error_responses(401),
)
def list_workers(session: ReadSession, state: State) -> list[dict[str, Any]]:
    return fleet.list_workers(session, stale_after_s=state.settings.stale_after_s)
