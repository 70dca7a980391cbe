"""Lightning: a callback that asks for a recipe when `fit` starts and applies it.

    trainer = L.Trainer(callbacks=[BatchsizeCallback(loss="cross_entropy", url=URL, time_budget_s=120)])
    trainer.fit(module, datamodule)   # datamodule.batch_size, accumulate_grad_batches, module.lr set first

Works with `lightning` (lightning.pytorch) or `pytorch_lightning`, whichever is installed (the former
first).
"""

from __future__ import annotations

from typing import Any

from batchsize_client.errors import BatchsizeError
from batchsize_client.recipe import Recipe

try:  # pragma: no cover - depends on which package is installed
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.parsing import lightning_hasattr, lightning_setattr


def gradient_bytes(module: Any) -> int:
    """Bytes of one copy of the trainable parameters' gradients."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def measured_in_lightning_loop(recipe: Recipe) -> bool:
    """True when the recipe's memory limit was measured in Lightning's loop convention."""
    return recipe.search is not None and recipe.search.loop == "lightning"


def prefetched_batches(loader: Any) -> int:
    """Batches Lightning's data fetcher holds ahead of the one training: 1 when the loader has no length."""
    if loader is None:
        return 0
    try:
        len(loader)
    except (TypeError, NotImplementedError):
        return 1
    return 0


class BatchsizeCallback(pl.Callback):
    """At `fit` start: get a recipe (given, or asked for with `batchsize_client.recommend` on the
    LightningModule and the first batch of its training data) and apply it:

    - the micro-batch to `batch_size_attr` (found on the module, its hparams or the datamodule, as
      Lightning's own batch-size finder does), before the training dataloader is built;
    - `trainer.accumulate_grad_batches`;
    - the learning rate to the module's `lr` or `learning_rate`, and `warmup_steps` when it has one
      (use them in `configure_optimizers`, e.g. `recipe.scheduler(optimizer)`).

    A recipe it asks for is measured in Lightning's own loop (`training.loop="lightning"`: the previous
    step's gradients alive through the forward, zeroed before backward; `training.prefetch_batches=1`
    when the training DataLoader has no length, as Lightning's fetcher then holds the next batch), so
    its micro-batch fits there as measured. A recipe given, or measured in the plain PyTorch loop
    (`recipe.search.loop` is not "lightning"), gets with `lightning_headroom` (default) the predicted
    headroom instead: the micro-batch is lowered to leave one more copy of the gradients free, predicted
    from the recipe's memory model (`Recipe.with_extra_memory`; accumulation grows to keep the global
    batch). The applied recipe is `callback.recipe`.
    """

    def __init__(
        self,
        recipe: Recipe | None = None,
        *,
        example_inputs: Any = None,
        loss: str = "cross_entropy",
        batch_size_attr: str = "batch_size",
        lightning_headroom: bool = True,
        **recommend_kwargs: Any,
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.example_inputs = example_inputs
        self.loss = loss
        self.batch_size_attr = batch_size_attr
        self.lightning_headroom = lightning_headroom
        self.recommend_kwargs = recommend_kwargs

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        recipe = self.recipe or self._ask(trainer, pl_module)
        if self.lightning_headroom and not measured_in_lightning_loop(recipe):
            recipe = recipe.with_extra_memory(gradient_bytes(pl_module))
        self.apply(recipe, trainer, pl_module)

    def apply(self, recipe: Recipe, trainer: Any, pl_module: Any) -> None:
        """Set the micro-batch, accumulation, learning rate and warm-up on the trainer and module."""
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise BatchsizeError(
                f"neither the LightningModule, its hparams nor the datamodule has {self.batch_size_attr!r}: "
                "give the dataloader's batch size that name (or pass batch_size_attr=...)",
                code="no_batch_size_attribute",
            )
        lightning_setattr(pl_module, self.batch_size_attr, recipe.micro_batch_size)
        trainer.accumulate_grad_batches = recipe.gradient_accumulation_steps
        for name in ("lr", "learning_rate"):
            if lightning_hasattr(pl_module, name):
                lightning_setattr(pl_module, name, recipe.learning_rate)
                break
        if lightning_hasattr(pl_module, "warmup_steps"):
            lightning_setattr(pl_module, "warmup_steps", recipe.warmup_steps)
        self.recipe = recipe

    def _ask(self, trainer: Any, pl_module: Any) -> Recipe:
        from batchsize_client.inprocess import recommend

        loader = None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        elif hasattr(pl_module, "train_dataloader"):
            loader = pl_module.train_dataloader()
        example = self.example_inputs
        if example is None:
            if loader is None:
                raise BatchsizeError(
                    "no training dataloader to take an example batch from: pass example_inputs"
                )
            batch = next(iter(loader))
            example = batch[0] if isinstance(batch, list | tuple) else batch
        training = {
            "loop": "lightning",
            "prefetch_batches": prefetched_batches(loader),
            **self.recommend_kwargs,
        }
        return recommend(pl_module, example, dataset=loader, loss=self.loss, **training)
