"""`batchsize recommend` shows confidence and the objective used, and guards against weak answers."""

from __future__ import annotations

from typer.testing import CliRunner

from service.cli import answer_problems, app

runner = CliRunner(env={"BATCHSIZE_URL": None, "BATCHSIZE_API_KEY": None, "COLUMNS": "120"})
# A 3 s budget leaves no time for the noise scale: time_to_target falls back to the throughput knee.
TINY = ["recommend", "-m", "mlp", "--config", '{"hidden_dims": [16]}', "--dataset-size", "2048",
        "--memory-budget", "4MiB", "--time-budget", "3", "--local", "--no-progress"]  # fmt: skip


def test_a_fallback_warns_loudly_and_fails_with_strict() -> None:
    loose = runner.invoke(app, TINY)
    assert loose.exit_code == 0, loose.output
    assert "objective used: throughput" in loose.stderr and "WARNING" in loose.stderr
    assert "fallback: asked for time_to_target" in loose.stderr
    strict = runner.invoke(app, [*TINY, "--strict"])
    assert strict.exit_code == 3 and "fallback" in strict.stderr


def test_answer_problems() -> None:
    sound = {"objective": "throughput", "objective_used": "throughput", "confidence": "high"}
    assert answer_problems(sound) == []
    assert answer_problems({**sound, "confidence": "low", "confidence_reasons": ["built-in data"]}) == [
        "confidence is low (built-in data)"
    ]
    partial = {**sound, "partial": True, "max_feasible_is_lower_bound": True, "max_feasible_batch_size": 4}
    assert answer_problems(partial) == ["partial: max_feasible_batch_size 4 is only a lower bound"]
