"""What the running app holds: built once in the lifespan, reached by routes through dependencies."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

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
    finished_jobs: FinishedJobCache = field(default_factory=lambda: FinishedJobCache())


class FinishedJobCache:
    """JSON of finished recommendations, which never change again: repeated reads skip the database."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, recommendation_id: str) -> bytes | None:
        with self._lock:
            body = self._items.get(recommendation_id)
            if body is not None:
                self._items.move_to_end(recommendation_id)
            return body

    def put(self, recommendation_id: str, body: bytes) -> None:
        with self._lock:
            self._items[recommendation_id] = body
            self._items.move_to_end(recommendation_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


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
