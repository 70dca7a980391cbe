"""/v1/models and /v1/device: what can be probed, and on what."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import State
from service.errors import error_responses
from service.schemas import DeviceOut, ZooModel
from service.zoo import describe_zoo

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get(
    "/models",
    response_model=list[ZooModel],
    summary="The model zoo and its config schemas",
    responses=error_responses(401),
)
def list_models() -> list[dict]:
    return describe_zoo()


@router.get(
    "/device",
    response_model=DeviceOut,
    summary="The device this host probes on",
    responses=error_responses(401),
)
def get_device(state: State) -> dict:
    from service.probing.memory import describe_device

    info = describe_device(state.host.type)
    return {key: info[key] for key in ("type", "name", "memory_bytes", "free_bytes", "count")}
