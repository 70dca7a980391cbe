"""What the running app holds: built once in the lifespan, reached by routes through dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.recommendations import HostDevice
from service.worker import Worker


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    reads: sessionmaker[Session]
    writes: sessionmaker[Session]
    host: HostDevice
    worker: Worker | None = None


def detect_host(settings: Settings) -> HostDevice:
    """The device this host's probes run on: settings.probe_device, else CUDA when available."""
    import torch

    from service.probing.memory import describe_device

    device = settings.probe_device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = describe_device(device)
    return HostDevice(
        type=info["type"],
        name=info["name"],
        memory_bytes=int(info["memory_bytes"]),
        free_bytes=int(info["free_bytes"]),
        count=int(info["count"]),
    )
