"""The `batchsize` command: serve, worker, migrate; and a client: recommend, status, list, models, device,
upload."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypedDict

import typer

app = typer.Typer(help="batchsize-service: recommends training batch sizes.", no_args_is_help=True)

# Choices, listed by --help and checked before anything runs.
Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["fp32", "bf16", "fp16"]
Objective = Literal["time_to_target", "throughput", "max_feasible"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _show_version(value: bool) -> None:
    if value:
        from service import __version__

        typer.echo(f"batchsize {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """batchsize-service: recommends training batch sizes."""


def _logging(level: str, fmt: str = "text") -> None:
    from service.observability import configure_logging

    configure_logging(fmt, level)  # BATCHSIZE_LOG_FORMAT: json (default) or text


# How uvicorn serves the app (bench/load.py serves its bare baseline the same way). httptools parses HTTP
# 1.7x faster than h11 here; uvloop is left out on purpose: with it, p99 at 50 connections went from
# ~25-50 ms to 100-450 ms (some connections starve) for ~5 % more requests/s (docs/benchmarks/load.md).
class ServerOptions(TypedDict):
    loop: str
    http: str
    log_config: None
    access_log: bool


SERVER: ServerOptions = {
    "loop": "asyncio",
    "http": "httptools",
    "log_config": None,  # keep _logging's handler: uvicorn's lines come out in the same format
    "access_log": False,  # service.observability logs each request, with its request id
}


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

    settings = Settings()
    _logging(log_level, settings.log_format)
    application = create_app(settings, run_worker=worker)
    uvicorn.run(
        application, host=host or settings.host, port=port or settings.port, log_level=log_level, **SERVER
    )


@app.command("worker")
def run_worker(log_level: str = typer.Option("info")) -> None:
    """Run only the probe worker (e.g. one per GPU host sharing a database)."""
    from service.config import Settings
    from service.db import migrate
    from service.db.session import make_engine, make_session_factories
    from service.state import detect_host
    from service.worker import Worker

    settings = Settings()
    _logging(log_level, settings.log_format)
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


# --------------------------------------------------------------------------------------------------
# Client commands: talk to a running service (--url), or probe in this process (--local).

UrlOption = typer.Option(
    "http://127.0.0.1:8000", "--url", envvar="BATCHSIZE_URL", help="The service's base URL."
)
ApiKeyOption = typer.Option(
    None, "--api-key", envvar="BATCHSIZE_API_KEY", help="X-API-Key, when the service requires one."
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
_SIZE_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | None) -> int | None:
    """Bytes from '268435456', '256MiB', '1.5G' or '80GB' (None stays None)."""
    import re

    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise typer.BadParameter(f"not a size: {text!r} (e.g. 268435456, 256MiB, 16GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _json_option(text: str | None, name: str) -> dict | None:
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{name} must be a JSON object")
    return value


def _client(url: str, api_key: str | None):  # returns a BatchsizeClient, imported lazily
    from batchsize_client import BatchsizeClient

    return BatchsizeClient(url, api_key=api_key)


def _fail(message: str, code: int = 1) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    return typer.Exit(code)


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """A BatchsizeError from the client (a refused request, an unreachable server) becomes
    `error: <message>` on stderr and exit status 1."""
    from batchsize_client import BatchsizeError

    try:
        yield
    except BatchsizeError as exc:
        raise _fail(str(exc)) from None


def _print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


class _ProgressBar:
    """A rich progress bar on stderr: phase, trials done/planned, elapsed time."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("queued", total=None)
        self.done = 0
        self.planned = 0

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()

    def show(self, label: str, done: int, planned: int) -> None:
        self.progress.update(self.task, description=label, completed=done, total=max(planned, done, 1))

    def on_job(self, job) -> None:  # job: batchsize_client.Job, imported lazily
        """client.wait's callback: the job as GET /v1/recommendations/{id} shows it."""
        progress = job.progress
        label = (progress.phase or job.status) if job.status == "running" else job.status
        self.show(str(label), progress.trials_done, progress.trials_planned)

    def on_event(self, event: dict) -> None:
        """run_probe's emit: the same bookkeeping as the worker's (service.worker)."""
        if event.get("event") == "phase":
            self.phase = str(event.get("phase"))
            self.planned = self.done + int(event.get("trials_planned") or 0)
        elif event.get("event") == "trial":
            self.done += 1
            self.planned = max(self.planned, self.done)
        self.show(getattr(self, "phase", "setup"), self.done, self.planned)


def _recipe_table(result: dict, title: str = "Recommended training recipe"):
    from rich.table import Table

    from service.recipe_text import recipe_items

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for item in recipe_items(result, details=True):
        table.add_row(item.label, f"{item.text} ({item.hint})" if item.hint else item.text)
    return table


def _print_recipe(result: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(_recipe_table(result))
    for warning in result.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command()
def recommend(
    model: str = typer.Option(None, "--model", "-m", help="A zoo model (see `batchsize models`)."),
    config: str = typer.Option(
        None, "--config", help="Zoo config overrides as JSON, e.g. '{\"width\": 32}'."
    ),
    artifact: str = typer.Option(None, "--artifact", help="An uploaded model's artifact id."),
    model_file: Path = typer.Option(
        None,
        "--model-file",
        exists=True,
        dir_okay=False,
        help="A torch.export archive (.pt2): uploaded first.",
    ),
    loss: str = typer.Option(
        None, "--loss", help="With --model-file: cross_entropy, mse or model_returns_loss."
    ),
    input_spec: str = typer.Option(
        None, "--input", help='With --model-file: JSON {"shape", "dtype", "high"}.'
    ),
    target_spec: str = typer.Option(None, "--target", help="With --model-file: JSON like --input."),
    num_classes: int = typer.Option(None, "--num-classes", help="With --model-file (optional)."),
    dataset_size: int = typer.Option(50_000, "--dataset-size", "-n", help="Training samples per epoch."),
    sample: str = typer.Option(None, "--sample", help="An uploaded data sample's artifact id."),
    sample_file: Path = typer.Option(
        None, "--sample-file", exists=True, dir_okay=False, help="A data sample (.npz/.safetensors)."
    ),
    optimizer: Optimizer = typer.Option("sgd", "--optimizer", help="The optimizer you train with."),
    learning_rate: float = typer.Option(0.1, "--lr", help="Learning rate tuned at --reference-batch-size."),
    reference_batch_size: int = typer.Option(32, "--reference-batch-size"),
    precision: Precision = typer.Option("fp32", "--precision", help="Training precision."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    devices: int = typer.Option(1, "--devices", help="Data-parallel devices the training will use."),
    target_type: str = typer.Option(None, "--target-device", help="cpu or cuda, when it is not this host's."),
    target_memory: str = typer.Option(None, "--target-memory", help="Target device memory, e.g. 80GB."),
    allow_extrapolation: bool = typer.Option(
        False,
        "--allow-extrapolation",
        help="Let a worker on another device answer for the target by extrapolation when none has it.",
    ),
    memory_budget: str = typer.Option(None, "--memory-budget", help="Per-device budget, e.g. 256MiB."),
    objective: Objective = typer.Option("time_to_target", "--objective", help="What to optimise."),
    time_budget: float = typer.Option(120.0, "--time-budget", help="Seconds the probe may take."),
    force: bool = typer.Option(False, "--force", help="Probe again even if a stored answer exists."),
    wait_timeout: float = typer.Option(900.0, "--timeout", help="Seconds to wait for the answer."),
    local: bool = typer.Option(False, "--local", help="Probe in this process, without a server."),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Exit with status 3 when the answer is low-confidence, a fallback or partial (default: warn).",
    ),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live progress bar."),
) -> None:
    """Recommend a batch size, gradient accumulation and learning rate for a model; shows live progress."""
    sources = [x for x in (model, artifact, model_file) if x is not None]
    if len(sources) != 1:
        raise _fail("give exactly one of --model, --artifact or --model-file", 2)
    if artifact is not None and local:
        raise _fail("--artifact names a model on a server; with --local use --model-file", 2)
    declared = {
        "loss": loss,
        "input": _json_option(input_spec, "--input"),
        "target": _json_option(target_spec, "--target"),
        "num_classes": num_classes,
    }
    if model_file is not None and loss is None:
        raise _fail("--model-file needs --loss (cross_entropy, mse, l1, huber or model_returns_loss)", 2)
    device = None
    if target_type or target_memory:
        device = {"type": target_type, "memory_bytes": parse_size(target_memory), "count": devices}
        if allow_extrapolation:
            device["allow_extrapolation"] = True
    elif devices != 1:
        device = {"count": devices}
    settings = {
        "dataset_size": dataset_size,
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "reference_batch_size": reference_batch_size,
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "device": device,
        "memory_budget_bytes": parse_size(memory_budget),
        "objective": objective,
        "time_budget_s": time_budget,
    }
    zoo_config = _json_option(config, "--config")
    if local:
        result = _recommend_local(
            model, zoo_config, model_file, declared, sample_file, settings, as_json, progress
        )
    else:
        result = _recommend_remote(
            url, api_key, model, zoo_config, artifact, model_file, declared, sample, sample_file, settings,
            force=force, wait_timeout=wait_timeout, as_json=as_json, progress=progress,
        )  # fmt: skip
    _guard_answer(result, strict=strict)


def answer_problems(result: dict) -> list[str]:
    """Why a training pipeline should not take this answer blindly: low confidence, a fallback to
    another objective than the one asked for, or an answer the time budget cut short."""
    problems = []
    asked, used = result.get("objective"), result.get("objective_used")
    if used and asked and used != asked:
        problems.append(f"fallback: asked for {asked}, answered as {used}")
    if result.get("confidence") == "low":
        reasons = "; ".join(result.get("confidence_reasons") or []) or "see the warnings"
        problems.append(f"confidence is low ({reasons})")
    if result.get("max_feasible_is_lower_bound"):
        problems.append(
            f"partial: max_feasible_batch_size {result.get('max_feasible_batch_size')} is only a lower bound"
        )
    elif result.get("partial"):
        problems.append("partial: the time budget cut the probe short")
    return problems


def _guard_answer(result: dict, *, strict: bool) -> None:
    """Print the answer's confidence and objective; warn loudly (stderr) about a weak answer, or with
    --strict fail with status 3."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(
        f"confidence: {result.get('confidence')}, objective used: {result.get('objective_used')}",
        highlight=False,
    )
    problems = answer_problems(result)
    if not problems:
        return
    label = "[bold red]error:[/]" if strict else "[bold yellow]WARNING:[/]"
    for problem in problems:
        console.print(f"{label} {problem}", highlight=False)
    if strict:
        raise typer.Exit(3)
    console.print("[bold yellow]WARNING:[/] check the warnings before training with this answer "
                  "(--strict makes this an error)", highlight=False)  # fmt: skip


def _recommend_remote(
    url: str,
    api_key: str | None,
    model: str | None,
    zoo_config: dict | None,
    artifact: str | None,
    model_file: Path | None,
    declared: dict,
    sample: str | None,
    sample_file: Path | None,
    settings: dict,
    *,
    force: bool,
    wait_timeout: float,
    as_json: bool,
    progress: bool,
) -> dict:
    from batchsize_client import RecommendationFailed, build_request

    with _client(url, api_key) as client, _client_errors():
        try:
            if model_file is not None:
                artifact = client.upload_model(
                    model_file,
                    loss=declared["loss"],
                    input=declared["input"],
                    target=declared["target"],
                    num_classes=declared["num_classes"],
                )["id"]
            if sample_file is not None:
                sample = client.upload_sample(sample_file)["id"]
            body = build_request(
                model, config=zoo_config, artifact_id=artifact, sample_id=sample, force=force, **settings
            )
            with _ProgressBar(progress and not as_json) as bar:
                job = client.submit(body)
                done = client.wait(job.id, timeout_s=wait_timeout, on_progress=bar.on_job)
        except RecommendationFailed as exc:
            raise _fail(f"recommendation {exc.job.id} {exc.job.status}: {exc.code}: {exc.message}") from None
    job_json = done.model_dump(mode="json")
    if as_json:
        _print_json(job_json)
    else:
        typer.echo(f"recommendation {done.id}")
        _print_recipe(job_json["result"])
    return job_json["result"]


def _recommend_local(
    model: str | None,
    zoo_config: dict | None,
    model_file: Path | None,
    declared: dict,
    sample_file: Path | None,
    settings: dict,
    as_json: bool,
    progress: bool,
) -> dict:
    from service.local import local_probe_spec, run_local
    from service.probing.spec import ProbeError

    try:
        spec = local_probe_spec(model, zoo_config, model_file, declared, sample_file, settings)
        with _ProgressBar(progress and not as_json) as bar:
            result = run_local(spec, bar.on_event)
    except ProbeError as exc:
        raise _fail(f"{exc.code}: {exc.message}") from None
    if as_json:
        _print_json({"id": None, "status": "succeeded", "result": result})
    else:
        _print_recipe(result)
    return result


# Ids printed by `list` are accepted whole; a shorter prefix is looked up among this many newest jobs.
PREFIX_SEARCH_LIMIT = 200


def resolve_id(client, recommendation_id: str) -> str:  # client: batchsize_client.BatchsizeClient
    """The full id for `recommendation_id`: itself when it exists, else the one recent id it prefixes."""
    from batchsize_client import BatchsizeError

    try:
        return client.get(recommendation_id).id
    except BatchsizeError as exc:
        if exc.status_code != 404:
            raise
        not_found = exc
    matches = [
        job.id for job in client.list(limit=PREFIX_SEARCH_LIMIT).items if job.id.startswith(recommendation_id)
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise BatchsizeError(
            f"{recommendation_id!r} is a prefix of {len(matches)} ids ({', '.join(matches[:5])}): give more",
            status_code=404,
            code="ambiguous_id",
        )
    raise not_found


@app.command()
def status(
    recommendation_id: str = typer.Argument(..., help="The recommendation's id (or a unique prefix of it)."),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Show a recommendation: status, progress, and its recipe or error."""
    with _client(url, api_key) as client, _client_errors():
        job = client.get(resolve_id(client, recommendation_id))
    if as_json:
        _print_json(job.model_dump(mode="json"))
        return
    progress = job.progress
    typer.echo(
        f"{job.id}  {job.status}  phase={progress.phase or '-'}  "
        f"trials={progress.trials_done}/{progress.trials_planned}"
    )
    if job.error:
        typer.echo(f"error: {job.error.code}: {job.error.message}")
    if job.result:
        _print_recipe(job.result.model_dump(mode="json"))


@app.command("list")
def list_recommendations(
    status_filter: JobStatus = typer.Option(None, "--status", help="Only jobs with this status."),
    model: str = typer.Option(None, "--model", help="Zoo model name."),
    limit: int = typer.Option(20, "--limit"),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
) -> None:
    """List recommendations, newest first."""
    from rich.console import Console
    from rich.table import Table

    with _client(url, api_key) as client, _client_errors():
        page = client.list(status=status_filter, model=model, limit=limit).model_dump(mode="json")
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"Recommendations ({page['total']} in all)", title_justify="left")
    # Ids whole, never cut: `status` takes what `list` prints.
    width = max((len(job["id"]) for job in page["items"]), default=2)
    table.add_column("id", no_wrap=True, min_width=width)
    for column in ("status", "model", "batch", "micro x accum", "learning rate", "created"):
        table.add_column(column)
    for job in page["items"]:
        result = job.get("result") or {}
        model_ref = job["request"].get("model", {})
        table.add_row(
            job["id"],
            job["status"],
            str(model_ref.get("name") or f"artifact {str(model_ref.get('artifact_id'))[:12]}"),
            str(result.get("recommended_batch_size", "")),
            f"{result['micro_batch_size']} x {result.get('gradient_accumulation_steps', 1)}"
            if result
            else "",
            f"{result['learning_rate']:.4g}" if result.get("learning_rate") is not None else "",
            str(job["created_at"])[:19],
        )
    Console().print(table)


@app.command()
def models(
    local: bool = typer.Option(False, "--local", help="This installation's zoo, without a server."),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
) -> None:
    """The model zoo: names, default configs and input shapes."""
    from rich.console import Console
    from rich.table import Table

    if local:
        from service.zoo import describe_zoo

        zoo = describe_zoo()
    else:
        with _client(url, api_key) as client, _client_errors():
            zoo = client.models()
    if as_json:
        _print_json(zoo)
        return
    table = Table(title="Model zoo", title_justify="left")
    for column in ("name", "input", "description"):
        table.add_column(column)
    for entry in zoo:
        table.add_row(entry["name"], f"{entry['input_shape']} {entry['input_dtype']}", entry["description"])
    Console().print(table)


@app.command()
def device(
    local: bool = typer.Option(False, "--local", help="This machine's device, without a server."),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
) -> None:
    """The device the service probes on (or this machine's, with --local)."""
    if local:
        import torch

        from service.probing.memory import describe_device

        info = describe_device("cuda" if torch.cuda.is_available() else "cpu")
        info = {key: info[key] for key in ("type", "name", "memory_bytes", "free_bytes", "count")}
    else:
        with _client(url, api_key) as client, _client_errors():
            info = client.device()
    if as_json:
        _print_json(info)
        return
    gib = 2**30
    typer.echo(
        f"{info['type']}  {info['name']}  memory {info['memory_bytes'] / gib:.1f} GiB  "
        f"free {info['free_bytes'] / gib:.1f} GiB  count {info['count']}"
    )


@app.command()
def upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A .pt2 model or a data sample."),
    kind: str = typer.Option(..., "--kind", help="model or sample."),
    loss: str = typer.Option(None, "--loss", help="Models: cross_entropy, mse or model_returns_loss."),
    input_spec: str = typer.Option(None, "--input", help='Models: JSON {"shape", "dtype", "high"}.'),
    target_spec: str = typer.Option(None, "--target", help="Models: JSON like --input."),
    num_classes: int = typer.Option(None, "--num-classes"),
    url: str = UrlOption,
    api_key: str = ApiKeyOption,
    as_json: bool = JsonOption,
) -> None:
    """Upload an exported model (.pt2) or a data sample; prints its artifact id."""
    if kind not in ("model", "sample"):
        raise _fail("--kind must be model or sample", 2)
    if kind == "model" and loss is None:
        raise _fail("a model upload needs --loss (cross_entropy, mse or model_returns_loss)", 2)
    with _client(url, api_key) as client, _client_errors():
        if kind == "model":
            artifact = client.upload_model(
                file,
                loss=loss,  # type: ignore[arg-type]
                input=_json_option(input_spec, "--input"),
                target=_json_option(target_spec, "--target"),
                num_classes=num_classes,
            )
        else:
            artifact = client.upload_sample(file)
    if as_json:
        _print_json(artifact)
    else:
        typer.echo(artifact["id"])


if __name__ == "__main__":
    app()
