"""The `batchsize` client commands: against a live server (--url) and in-process (--local)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from batchsize_client import Job
from service.app import create_app
from service.cli import _ProgressBar, app, parse_size
from service.config import Settings
from tests import exported_models as em
from tests.live_server import live_server

runner = CliRunner(env={"BATCHSIZE_URL": None, "BATCHSIZE_API_KEY": None, "COLUMNS": "120"})
TINY = ["-m", "mlp", "--config", '{"hidden_dims": [16]}', "--dataset-size", "2048", "--memory-budget", "4MiB"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    settings = Settings(data_dir=data_dir, probe_device="cpu", poll_interval_s=0.05, _env_file=None)
    with live_server(create_app(settings, run_worker=True)) as url:
        yield url


def _ok(args: list[str]) -> typer.testing.Result:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return result


def test_recommend_against_a_server_then_read_it_back(server: str) -> None:
    first = _ok(["recommend", *TINY, "--time-budget", "4", "--url", server, "--json"])
    job = json.loads(first.stdout)
    assert job["status"] == "succeeded"
    result = job["result"]
    assert result["recommended_batch_size"] >= 1 and result["memory"]["budget_bytes"] == 4 * 2**20

    # Same request again: answered from storage, shown as a table (the progress bar goes to stderr).
    table = _ok(["recommend", *TINY, "--time-budget", "4", "--url", server])
    assert f"recommendation {job['id']}" in table.stdout
    for label in (
        "Global batch size",
        "Micro-batch per device",
        "Gradient accumulation steps",
        "Learning rate",
    ):
        assert label in table.stdout
    assert str(result["recommended_batch_size"]) in table.stdout

    assert "succeeded" in _ok(["status", job["id"], "--url", server]).stdout
    assert job["id"] in _ok(["status", job["id"][:8], "--url", server]).stdout  # a unique prefix
    listed = _ok(["list", "--url", server]).stdout
    assert job["id"] in listed  # whole, so `status` accepts what `list` prints
    assert json.loads(_ok(["status", job["id"], "--url", server, "--json"]).stdout)["id"] == job["id"]
    assert job["id"] in _ok(["list", "--url", server]).stdout
    assert json.loads(_ok(["list", "--url", server, "--json"]).stdout)["total"] == 1
    assert "resnet" in _ok(["models", "--url", server]).stdout
    assert {m["name"] for m in json.loads(_ok(["models", "--url", server, "--json"]).stdout)} >= {
        "mlp",
        "gpt",
    }
    assert _ok(["device", "--url", server]).stdout.startswith("cpu")
    assert json.loads(_ok(["device", "--local", "--json"]).stdout)["type"] in ("cpu", "cuda")


def test_upload_and_errors(server: str, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["status", "nope", "--url", server])
    assert missing.exit_code == 1 and "not_found" in missing.stderr

    bad = runner.invoke(app, ["recommend", "-m", "no-such-model", "--url", server])
    assert bad.exit_code == 1 and "unknown_model" in bad.stderr

    both = runner.invoke(app, ["recommend", "-m", "mlp", "--artifact", "abc", "--url", server])
    assert both.exit_code == 2 and "exactly one" in both.stderr

    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    refused = runner.invoke(app, ["upload", str(junk), "--kind", "model", "--loss", "mse", "--url", server])
    assert refused.exit_code == 1 and "not_a_zip" in refused.stderr

    unreachable = runner.invoke(app, ["models", "--url", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.stderr


def test_every_server_command_reports_a_client_error_the_same_way(tmp_path: Path) -> None:
    """One unreachable server: each command prints `error: <the client's message>` and exits 1."""
    sample = tmp_path / "sample.npz"
    sample.write_bytes(b"unread")
    commands = [
        ["models"],
        ["device"],
        ["list"],
        ["status", "abc"],
        ["upload", str(sample), "--kind", "sample"],
        ["recommend", "-m", "mlp", "--no-progress"],
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--url", "http://127.0.0.1:9"])
        assert result.exit_code == 1, (command, result.output, result.exception)
        assert result.stderr.startswith("error: ") and "cannot reach" in result.stderr, command


def test_recommend_local_runs_the_probe_in_process() -> None:
    result = _ok(
        ["recommend", "--local", *TINY, "--time-budget", "3", "--objective", "max_feasible", "--json"]
    )
    body = json.loads(result.stdout)
    assert body["status"] == "succeeded" and body["id"] is None
    assert body["result"]["max_feasible_batch_size"] >= 1

    exported = _ok(
        [
            "recommend", "--local", "--model-file", str(em.cnn_archive()), "--loss", "cross_entropy",
            "--dataset-size", "1024", "--memory-budget", "8MiB", "--time-budget", "3",
        ]
    )  # fmt: skip
    assert "Global batch size" in exported.stdout

    failed = runner.invoke(app, ["recommend", "--local", "-m", "mlp", "--config", '{"nope": 1}'])
    assert failed.exit_code == 1 and "invalid_config" in failed.stderr


def test_progress_bar_bookkeeping_matches_the_worker() -> None:
    bar = _ProgressBar(enabled=False)
    bar.on_event({"event": "phase", "phase": "warmup", "trials_planned": 1})
    bar.on_event({"event": "trial", "phase": "warmup"})
    bar.on_event({"event": "phase", "phase": "memory", "trials_planned": 4})
    bar.on_event({"event": "trial", "phase": "memory"})
    task = bar.progress.tasks[0]
    assert (task.description, task.completed, task.total) == ("memory", 2, 5)
    bar.on_job(
        Job.model_validate(
            {
                "id": "x",
                "status": "running",
                "progress": {"phase": "throughput", "trials_done": 7, "trials_planned": 9},
            }
        )
    )
    assert (task.description, task.completed, task.total) == ("throughput", 7, 9)


def test_version_and_choices_in_help() -> None:
    from service import __version__

    assert _ok(["--version"]).stdout.strip() == f"batchsize {__version__}"
    shown = _ok(["recommend", "--help"]).stdout
    for choices in ("sgd|adam|adamw", "fp32|bf16|fp16", "time_to_target|throughput|max_fe"):
        assert choices in shown
    wrong = runner.invoke(app, ["recommend", "-m", "mlp", "--optimizer", "lamb", "--local"])
    assert wrong.exit_code == 2 and "lamb" in wrong.output + wrong.stderr


def test_parse_size() -> None:
    assert parse_size("268435456") == 268435456
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(None) is None
    with pytest.raises(typer.BadParameter):
        parse_size("lots")
