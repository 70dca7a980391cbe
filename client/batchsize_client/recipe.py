"""`Recipe`: a succeeded recommendation's result, typed, with helpers that apply it to a training loop.

torch and transformers are imported only by the helpers that need them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError

from batchsize_client.errors import BatchsizeError
from batchsize_client.models import Job, RecommendationResult, read_leniently

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch


class Recipe(RecommendationResult):
    """The training recipe (every field of `RecommendationResult`, the core ones never None)."""

    id: str | None = Field(None, description="The recommendation's id (None for an in-process probe).")
    recommended_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int = 1
    devices: int = 1
    learning_rate: float
    warmup_steps: int = 0
    steps_per_epoch: int = 0
    max_feasible_batch_size: int

    @classmethod
    def from_job(cls, job: Job | dict[str, Any]) -> Recipe:
        """The recipe of a succeeded job (a `Job` or its JSON)."""
        if isinstance(job, dict):
            job = Job.model_validate(job)
        if job.result is None:
            raise ValueError(f"recommendation {job.id} has no result (status {job.status})")
        return cls.from_result(job.result.model_dump(mode="json"), recommendation_id=job.id)

    @classmethod
    def from_result(cls, result: dict[str, Any], *, recommendation_id: str | None = None) -> Recipe:
        """The recipe from a result dict (an in-process probe's, or a job's `result`).

        A field this version cannot read as typed is left out with a warning (the full result stays in
        the job); a result without the recipe's core fields raises BatchsizeError `invalid_result`.
        """
        try:
            recipe, _unreadable = read_leniently(cls, {**result, "id": recommendation_id})
        except ValidationError as exc:
            raise BatchsizeError(
                f"the result holds no readable recipe: {exc}", code="invalid_result"
            ) from None
        return recipe  # type: ignore[return-value]

    # -- short names

    @property
    def batch_size(self) -> int:
        """The global batch size (`recommended_batch_size`)."""
        return self.recommended_batch_size

    @property
    def result(self) -> dict[str, Any]:
        """The result as JSON-ready dict (without `id`)."""
        return self.model_dump(mode="json", exclude={"id"})

    # -- plain PyTorch

    def dataloader_kwargs(self) -> dict[str, Any]:
        """`DataLoader(dataset, shuffle=True, **recipe.dataloader_kwargs())`: the micro-batch, and no short
        last batch (every step then accumulates the same number of samples)."""
        return {"batch_size": self.micro_batch_size, "drop_last": True}

    def scheduler(self, optimizer: torch.optim.Optimizer, *, set_learning_rate: bool = True) -> Any:
        """The warm-up as a torch LR scheduler (`torch.optim.lr_scheduler.LinearLR`); step it once per
        optimizer step (every `gradient_accumulation_steps` micro-batches).

        With `set_learning_rate` the optimizer's learning rate is set to the recipe's first. The warm-up
        climbs linearly from the reference learning rate to the recipe's over `warmup_steps`, then stays;
        with no warm-up the scheduler keeps the rate constant. Chain your own decay after it with
        `torch.optim.lr_scheduler.SequentialLR`.
        """
        from torch.optim.lr_scheduler import LinearLR

        if set_learning_rate:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate
                group.pop("initial_lr", None)
        if self.warmup_steps <= 0:
            return LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=1)
        return LinearLR(
            optimizer, start_factor=self.warmup_start_factor, end_factor=1.0, total_iters=self.warmup_steps
        )

    @property
    def warmup_start_factor(self) -> float:
        """Where the warm-up starts, as a fraction of `learning_rate` (the reference rate, or 1/warmup)."""
        reference = self.reference_learning_rate
        if reference and 0 < reference < self.learning_rate:
            return reference / self.learning_rate
        return 1.0 / max(1, self.warmup_steps)

    # -- memory headroom

    def with_extra_memory(self, extra_bytes: int) -> Recipe:
        """The same global batch with a micro-batch that leaves `extra_bytes` free, from the memory model.

        For loops that keep more alive than the probe measured (Lightning frees the previous gradients
        only after the next forward: up to one more copy of the gradients) when the recipe was not
        measured in that loop (a probe asked with `training.loop="lightning"` needs none). The new limit
        is predicted from the fitted memory model (`fixed + per_sample x B` under the budget), not
        measured; accumulation grows so the global batch stays (it may round up slightly).
        """
        memory = self.memory
        if extra_bytes <= 0 or memory is None or not memory.per_sample_bytes or memory.budget_bytes is None:
            return self
        room = memory.budget_bytes - (memory.fixed_bytes or 0) - extra_bytes
        limit = max(1, min(self.max_feasible_batch_size, math.floor(room / memory.per_sample_bytes)))
        if self.micro_batch_size <= limit:
            return self
        per_device = self.micro_batch_size * self.gradient_accumulation_steps
        accumulation = math.ceil(per_device / limit)
        micro = math.ceil(per_device / accumulation)
        warning = (
            f"micro-batch lowered from {self.micro_batch_size} to {micro} (x{accumulation} accumulation) to "
            f"leave {extra_bytes} bytes free, predicted from the memory model"
        )
        return self.model_copy(
            update={
                "micro_batch_size": micro,
                "gradient_accumulation_steps": accumulation,
                "recommended_batch_size": micro * accumulation * self.devices,
                "max_feasible_batch_size": limit,
                "warnings": [*(self.warnings or []), warning],
            }
        )

    # -- Hugging Face

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """The `transformers.TrainingArguments` fields this recipe sets."""
        return {
            "per_device_train_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "auto_find_batch_size": False,
        }

    def to_training_arguments(self, args: Any) -> Any:
        """A copy of `transformers.TrainingArguments` with the recipe's micro-batch, accumulation, learning
        rate and warm-up (everything else as given)."""
        import dataclasses

        return dataclasses.replace(args, **self.training_arguments_kwargs())
