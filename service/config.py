"""One settings object, read from `BATCHSIZE_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    sqlite_busy_timeout_ms: int = 5000
    api_key: str | None = Field(None, description="When set, every /v1 route requires it (X-API-Key header).")
    log_format: Literal["json", "text"] = Field(
        "json", description="`batchsize serve`/`worker` logs: one JSON object a line, or plain text."
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'batchsize.db').resolve()}"
