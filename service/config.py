"""One settings object, read from `BATCHSIZE_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHSIZE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Where the SQLite file and uploaded artifacts live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `batchsize.db` under data_dir."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    run_worker: bool = Field(True, description="Run the probe worker inside `batchsize serve`.")
    probe_device: str | None = Field(None, description="'cpu' or 'cuda'; default: cuda when available.")
    probe_timeout_s: float = Field(
        900.0, gt=0, description="Hard limit for one probe subprocess, on top of the request's time budget."
    )
    max_time_budget_s: float = Field(3600.0, gt=0, description="Largest time_budget_s a request may ask.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often an idle worker looks for queued jobs.")
    heartbeat_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often a worker refreshes its own and its job's heartbeat (and sees a cancel).",
    )
    stale_after_s: float = Field(
        60.0, gt=0, description="A running job without a heartbeat this long is re-queued."
    )
    device_wait_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="A queued request whose device no live worker has fails (`no_device`) after this long.",
    )
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest JSON body accepted.")
    max_upload_bytes: int = Field(
        256 * 1024**2, gt=0, description="Largest artifact upload (a .pt2 model or a data sample), in bytes."
    )
    artifact_dry_run_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Limit for the dry run (training steps at batch 2, 3, 1) of an uploaded model.",
    )
    artifact_check_concurrency: int = Field(
        2,
        gt=0,
        description="Uploads checked at once (a model's dry run is a training subprocess); more wait in a "
        "queue off the event loop.",
    )
    probe_max_address_space_bytes: int | None = Field(
        None,
        ge=0,
        description="RLIMIT_AS of CPU probe and dry-run processes. Default: 3/4 of physical memory, at "
        "least 8 GiB; 0: off. Never set for CUDA probes (the driver maps far more than it uses).",
    )
    probe_max_file_bytes: int = Field(
        1024**3, ge=0, description="RLIMIT_FSIZE of probe and dry-run processes (0: off)."
    )
    probe_max_processes: int = Field(
        4096,
        ge=0,
        description="RLIMIT_NPROC of probe and dry-run processes: threads and processes of the service's "
        "user (0: off; the kernel does not apply it to root).",
    )
    probe_standby: bool = Field(
        True,
        description="Each worker keeps one probe process waiting with torch and the engine imported (its "
        "sandbox applied), so that a job skips that start-up; it serves one job, then a new one is started. "
        "Costs that process's memory while idle.",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where a worker runs its probes: `local` (a subprocess on this host) or `ray` (a Ray "
        "task on a node with the worker's device kind; needs the `ray` extra; see docs/fleet.md).",
    )
    ray_address: str = Field(
        "auto",
        description="The Ray cluster a `ray` executor joins: `auto` (the one started on this host), "
        "`HOST:PORT` (its GCS) or `ray://HOST:10001` (Ray Client).",
    )
    ray_max_attempts: int = Field(
        3, ge=1, description="Attempts a job gets when the Ray nodes running its probe are lost mid-probe."
    )
    sqlite_busy_timeout_ms: int = 5000
    database_pool_size: int = Field(
        40,
        ge=1,
        description="Database connections a process keeps (plus 10 more under bursts). The default matches "
        "the server's 40 request threads, so a request never waits for a connection; on PostgreSQL, size "
        "max_connections (or PgBouncer) for replicas x (this + 10) plus a few per worker.",
    )
    api_key: str | None = Field(None, description="When set, every /v1 route requires it (X-API-Key header).")
    log_format: Literal["json", "text"] = Field(
        "json", description="`batchsize serve`/`worker` logs: one JSON object a line, or plain text."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Browser origins (comma-separated, e.g. `https://a.example,https://b.example`; `*` for any) "
            "allowed to call the API from their pages: CORS is opened to them and their state-changing "
            "requests pass the cross-site check. Empty (default): no CORS, other origins' POSTs refused."
        ),
    )
    min_free_disk_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="`/readyz` reports not ready when the data directory's disk has less free space.",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'batchsize.db').resolve()}"
