"""The Lightning callback, and the probe's `loop="lightning"` measured against real Lightning `fit` runs.

Every peak here is counted by the engine's CPU live-bytes tracker (CPUMemoryBudget), around the engine's
own step and around Lightning's `fit` alike. The model: an MLP whose gradients are a large share of its
memory next to its activations (512 -> 4 x 128 -> 10, Adam), where Lightning's loop needs more than the
plain PyTorch loop at the limit.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from batchsize_client import Recipe
from models.registry import get_model, make_config
from service.probing.engine import run_probe
from service.probing.memory import CPUMemoryBudget, measure_step
from service.probing.spec import ProbeError, ProbeSpec
from service.probing.step import TrainingStep, build_optimizer
from tests.ui import seed

pl = pytest.importorskip("pytorch_lightning")

from batchsize_client.lightning import (  # noqa: E402
    BatchsizeCallback,
    measured_in_lightning_loop,
    prefetched_batches,
)

MLP = get_model("mlp")
CONFIG = {"input_dim": 512, "hidden_dims": [128, 128, 128, 128], "num_classes": 10}
BUDGET = 3 * 2**20
DATASET = 2048
LEARNING_RATE = 1e-3


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Iterator[None]:
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Batches(torch.utils.data.IterableDataset):
    """Endless ready-made batches: a DataLoader without a length (Lightning then prefetches one)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(1)
        while True:
            yield MLP.make_batch(make_config(MLP, CONFIG), self.batch_size, "cpu", generator)


class ZooMLP(pl.LightningModule):
    """The zoo MLP (same layers, seed and optimizer as the probe's), with a `batch_size` to scale."""

    def __init__(self, batch_size: int = 32, *, sized: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP.build(make_config(MLP, CONFIG), False)
        self.batch_size = batch_size
        self.lr = LEARNING_RATE
        self.sized = sized
        generator = torch.Generator().manual_seed(0)
        self.data = torch.utils.data.TensorDataset(
            *MLP.make_batch(make_config(MLP, CONFIG), DATASET, "cpu", generator)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        inputs, targets = batch
        return MLP.loss(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer("adam", self.parameters(), self.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        if not self.sized:
            return torch.utils.data.DataLoader(Batches(self.batch_size), batch_size=None)
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class PeakOfTraining(pl.Callback):
    """Counts live tensor bytes from `on_train_start` to `on_train_end` (the optimizer steps included):
    the peak of each step and of the whole training."""

    def __init__(self) -> None:
        self.tracker: CPUMemoryBudget | None = None
        self.step_peaks: list[int] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.tracker = CPUMemoryBudget(None, roots=[pl_module, trainer.optimizers])
        self.tracker.__enter__()

    def on_train_batch_start(self, *_args: Any) -> None:
        self.tracker.reset_peak()

    def on_train_batch_end(self, *_args: Any) -> None:
        self.step_peaks.append(self.tracker.peak_bytes)

    def on_train_end(self, *_args: Any) -> None:
        self.tracker.__exit__(None, None, None)

    @property
    def peak_bytes(self) -> int:
        return max(self.step_peaks)


def trainer(*callbacks: Any, steps: int = 3) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def lightning_fit_peak(batch_size: int, *, sized: bool = True) -> PeakOfTraining:
    peak = PeakOfTraining()
    trainer(peak).fit(ZooMLP(batch_size, sized=sized))
    return peak


def engine_step_peak(batch_size: int, loop: str, prefetch_batches: int = 0) -> int:
    """The peak of the engine's step (after the warm-up, as the memory search measures it)."""
    step = TrainingStep(
        MLP,
        make_config(MLP, CONFIG),
        optimizer="adam",
        learning_rate=LEARNING_RATE,
        loop=loop,
        prefetch_batches=prefetch_batches,
    )
    step.warm_up(2)
    trials = [
        measure_step(step.run, batch_size, 2**40, step.device, roots=step.memory_roots()) for _ in range(2)
    ]
    assert all(t.ok for t in trials)
    return max(t.peak_bytes for t in trials)


@pytest.fixture(scope="module")
def limits() -> dict[str, int]:
    """max_feasible_batch_size of the same probe in each loop convention, same budget."""
    found = {}
    for loop in ("pytorch", "lightning"):
        spec = ProbeSpec(
            "mlp",
            CONFIG,
            optimizer="adam",
            learning_rate=LEARNING_RATE,
            memory_budget_bytes=BUDGET,
            objective="max_feasible",
            time_budget_s=60,
            dataset_size=DATASET,
            loop=loop,  # type: ignore[arg-type]
        )
        result = run_probe(spec, lambda _event: None)
        assert result["search"]["loop"] == loop
        assert not result["max_feasible_is_lower_bound"]
        found[loop] = result["max_feasible_batch_size"]
    return found


@pytest.mark.parametrize("batch_size", [32, 256])
def test_the_lightning_loop_step_peaks_where_lightnings_fit_does(batch_size: int) -> None:
    fitted = lightning_fit_peak(batch_size)
    assert fitted.step_peaks[1] == fitted.step_peaks[-1]  # from the second step on: the steady state
    measured = engine_step_peak(batch_size, "lightning")
    # The same bytes to within a few scalars (Lightning's loss clone, Adam's step counters).
    assert fitted.peak_bytes <= measured <= fitted.peak_bytes + 256


def test_lightnings_accumulating_fit_peaks_where_the_engines_accumulating_step_does() -> None:
    """accumulate_grad_batches=2: the second micro-step keeps the first one's gradients alive through its
    forward and backward; the engine's accumulating step (what a recipe with accumulation is checked in)."""
    peak = PeakOfTraining()
    fitting = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[peak],
    )
    fitting.fit(ZooMLP(256))
    step = TrainingStep(
        MLP, make_config(MLP, CONFIG), optimizer="adam", learning_rate=LEARNING_RATE, loop="lightning"
    )
    step.warm_up(2)
    trials = [
        measure_step(
            functools.partial(step.run, micro_steps=2), 256, 2**40, step.device, roots=step.memory_roots()
        )
        for _ in range(2)
    ]
    measured = max(t.peak_bytes for t in trials)
    assert peak.peak_bytes <= measured <= peak.peak_bytes + 256
    assert measured > engine_step_peak(256, "lightning")  # more than the step without accumulation


def test_a_dataloader_without_length_costs_one_prefetched_batch() -> None:
    fitted = lightning_fit_peak(256, sized=False)
    measured = engine_step_peak(256, "lightning", prefetch_batches=1)
    assert fitted.peak_bytes <= measured <= fitted.peak_bytes + 256
    assert measured > engine_step_peak(256, "lightning")  # the batch held ahead is counted


def test_the_callback_asks_for_a_prefetched_batch_only_when_the_loader_has_no_length() -> None:
    assert prefetched_batches(ZooMLP(sized=False).train_dataloader()) == 1
    assert prefetched_batches(ZooMLP().train_dataloader()) == 0
    assert prefetched_batches(None) == 0


def test_the_lightning_loop_limit_is_at_most_the_pytorch_loops(limits: dict[str, int]) -> None:
    # Here, where gradients are a large share of the memory, strictly lower.
    assert limits["lightning"] < limits["pytorch"]


def test_lightnings_fit_at_the_lightning_loop_limit_stays_within_the_budget(limits: dict[str, int]) -> None:
    assert lightning_fit_peak(limits["lightning"]).peak_bytes <= BUDGET
    # The plain loop's answer, applied to Lightning without headroom, does not fit.
    assert lightning_fit_peak(limits["pytorch"]).peak_bytes > BUDGET


def test_the_callback_asks_in_lightnings_loop_and_its_micro_batch_fits_the_fit() -> None:
    callback = BatchsizeCallback(
        loss="cross_entropy",
        local=True,
        optimizer="adam",
        learning_rate=LEARNING_RATE,
        memory_budget_bytes=BUDGET,
        objective="max_feasible",
        time_budget_s=60,
    )
    module, peak = ZooMLP(), PeakOfTraining()
    trainer(callback, peak, steps=2).fit(module)
    recipe = callback.recipe
    assert measured_in_lightning_loop(recipe) and recipe.search.measured_convention.startswith("Lightning")
    assert not any("lowered" in w for w in recipe.warnings)  # measured: no predicted headroom on top
    assert module.batch_size == recipe.micro_batch_size == recipe.max_feasible_batch_size
    assert module.lr == pytest.approx(recipe.learning_rate)
    assert peak.peak_bytes <= BUDGET


def given(loop: str | None) -> Recipe:
    result = seed.result()
    search = {**(result.get("search") or {}), "loop": loop}
    memory = {"fixed_bytes": 1000, "per_sample_bytes": 100, "budget_bytes": 1000 + 100 * 64}
    return Recipe.from_result(
        {**result, "search": search, "memory": memory, "micro_batch_size": 64, "max_feasible_batch_size": 64,
         "gradient_accumulation_steps": 1, "recommended_batch_size": 64, "devices": 1},
        recommendation_id="r",
    )  # fmt: skip


@pytest.mark.parametrize(("loop", "lowered"), [("lightning", False), ("pytorch", True), (None, True)])
def test_a_given_recipe_gets_the_predicted_headroom_unless_measured_in_lightnings_loop(
    loop: str | None, lowered: bool
) -> None:
    callback = BatchsizeCallback(given(loop))
    module = ZooMLP()
    callback.setup(trainer(callback), module, "fit")
    assert (module.batch_size < 64) is lowered
    assert module.batch_size * callback.recipe.gradient_accumulation_steps >= 64  # the global batch stays


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ProbeError, match="unknown training loop"):
        TrainingStep(MLP, make_config(MLP, CONFIG), loop="keras")
