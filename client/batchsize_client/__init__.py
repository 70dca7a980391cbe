"""batchsize-client: ask a batchsize service which batch size, accumulation and learning rate to train with.

    import batchsize_client as bc

    recipe = bc.recommend(model, example_batch, dataset=train_set, loss="cross_entropy")  # your nn.Module
    loader = DataLoader(train_set, shuffle=True, **recipe.dataloader_kwargs())

Needs httpx and pydantic only; `recommend(model, ...)` and the recipe's torch helpers import torch when
called. Framework hooks: `batchsize_client.lightning.BatchsizeCallback`, `Recipe.to_training_arguments`.
"""

from __future__ import annotations

from batchsize_client.client import AsyncBatchsizeClient, BatchsizeClient, build_request
from batchsize_client.errors import BatchsizeError, ExportError, RecommendationFailed, RecommendationTimeout
from batchsize_client.inprocess import recommend
from batchsize_client.models import Job, JobPage, RecommendationResult, Trial
from batchsize_client.recipe import Recipe

__version__ = "0.1.0"

__all__ = [
    "AsyncBatchsizeClient",
    "BatchsizeClient",
    "BatchsizeError",
    "ExportError",
    "Job",
    "JobPage",
    "Recipe",
    "RecommendationFailed",
    "RecommendationResult",
    "RecommendationTimeout",
    "Trial",
    "__version__",
    "build_request",
    "recommend",
]
