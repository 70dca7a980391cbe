"""What the running app holds: built once in the lifespan, reached by routes through dependencies."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.recommendations.service import HostDevice
from service.worker import Worker

V = TypeVar("V")


class LruCache(Generic[V]):
    """A bounded, thread-safe map from str keys that drops the least recently used entry."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def pop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    reads: sessionmaker[Session]
    writes: sessionmaker[Session]
    host: HostDevice
    worker: Worker | None = None
    # JSON of finished recommendations by id: they never change again, so repeated reads skip the database.
    finished_jobs: LruCache[bytes] = field(default_factory=LruCache)
    # Request key (see recommendations.answer_key) -> (id of the succeeded job that answered it, until when
    # to trust that): a repeated POST skips validation, the model's meta build and the lookup. The expiry
    # bounds how long a newer answer (a `force`d re-probe finishing) can go unseen.
    answered_requests: LruCache[tuple[str, float]] = field(default_factory=LruCache)
    # Digest of a request body (cached_reads.body_digest) -> its request key, for bodies that validated to a
    # memoisable, unforced request: the same bytes are answered before routing, without parsing them again.
    request_keys: LruCache[str] = field(default_factory=LruCache)

    def memoised_answer(self, key: str) -> tuple[str, bytes] | None:
        """(job id, JSON) of the succeeded job that answered request `key`, while that is still trusted."""
        answered = self.answered_requests.get(key)
        if answered is None or time.monotonic() >= answered[1]:
            return None
        body = self.finished_jobs.get(answered[0])
        return None if body is None else (answered[0], body)


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
