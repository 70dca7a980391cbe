"""The `batchsize` command: serve, worker, migrate."""

from __future__ import annotations

import logging
import signal
import threading

import typer

app = typer.Typer(help="batchsize-service: recommends training batch sizes.", no_args_is_help=True)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default: BATCHSIZE_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default: BATCHSIZE_PORT or 8000)."),
    worker: bool = typer.Option(None, "--worker/--no-worker", help="Run the probe worker in this process."),
    log_level: str = typer.Option("info"),
) -> None:
    """Apply migrations and serve the HTTP API (with the probe worker unless --no-worker)."""
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    _logging(log_level)
    settings = Settings()
    application = create_app(settings, run_worker=worker)
    uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_level=log_level)


@app.command("worker")
def run_worker(log_level: str = typer.Option("info")) -> None:
    """Run only the probe worker (e.g. one per GPU host sharing a database)."""
    from service.config import Settings
    from service.db import migrate
    from service.db.session import make_engine, make_session_factories
    from service.state import detect_host
    from service.worker import Worker

    _logging(log_level)
    settings = Settings()
    migrate.upgrade(settings.resolved_database_url)
    engine = make_engine(settings)
    _, writes = make_session_factories(engine)
    worker = Worker(settings=settings, sessions=writes, host=detect_host(settings))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop_event.set())
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    engine.dispose()


@app.command()
def migrate(revision: str = typer.Argument("head", help="Alembic revision to upgrade to.")) -> None:
    """Apply database migrations (the service also does this on start)."""
    from service.config import Settings
    from service.db import migrate as migrations

    settings = Settings()
    migrations.upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {settings.resolved_database_url} is at {revision}")


if __name__ == "__main__":
    app()
