"""Typed ORM tables. The schema itself is made by Alembic (migrations/), never by `create_all`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.db.base import Base

# JSON columns are JSONB on PostgreSQL (binary, indexable), plain JSON text on SQLite.
JSONColumn = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always hands back timezone-aware datetimes (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Recommendation(Base):
    """One recommendation job: the request, its progress, and its result or error."""

    __tablename__ = "recommendations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # a service.status.JobStatus
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSONColumn)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONColumn, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    trials_planned: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The device the request asked for (None: any worker may take it). The name is a lower-case LIKE
    # pattern made from the client's glob; see service.fleet.device_requirement.
    device_type: Mapped[str | None] = mapped_column(String(16), default=None)
    device_name_like: Mapped[str | None] = mapped_column(String(256), default=None)
    device_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    allow_extrapolation: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Why a queued job is not being claimed (no live worker has its device), shown as progress.reason.
    waiting_reason: Mapped[str | None] = mapped_column(Text, default=None)

    trials: Mapped[list[Trial]] = relationship(
        back_populates="recommendation", cascade="all, delete-orphan", order_by="Trial.index"
    )

    __table_args__ = (
        # At most one queued-or-running job per fingerprint: identical concurrent POSTs share one probe.
        Index(
            "uq_recommendations_active_fingerprint",
            "fingerprint",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        # The claim's scan: the oldest queued jobs, without walking past every finished one.
        Index(
            "ix_recommendations_queued",
            "created_at",
            "id",
            sqlite_where=text("status = 'queued'"),
            postgresql_where=text("status = 'queued'"),
        ),
    )


class Trial(Base):
    """One measured probe step (memory search, throughput ladder, noise scale, race)."""

    __tablename__ = "trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recommendation_id: Mapped[str] = mapped_column(
        ForeignKey("recommendations.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    batch_size: Mapped[int | None] = mapped_column(Integer, default=None)
    outcome: Mapped[str] = mapped_column(String(16))
    peak_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    step_time_s: Mapped[float | None] = mapped_column(Float, default=None)
    samples_per_second: Mapped[float | None] = mapped_column(Float, default=None)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONColumn, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    recommendation: Mapped[Recommendation] = relationship(back_populates="trials")


class Artifact(Base):
    """An uploaded file (a data sample or an exported model), stored by content hash."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the content
    kind: Mapped[str] = mapped_column(String(16), index=True)  # "sample" | "model"
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONColumn, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """A running worker and the device it probes on, kept alive by its heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:random (service.worker)
    host: Mapped[str] = mapped_column(String(255))
    device_type: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str] = mapped_column(String(256))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    device_count: Mapped[int] = mapped_column(Integer)
    current_job: Mapped[str | None] = mapped_column(String(32), default=None)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
