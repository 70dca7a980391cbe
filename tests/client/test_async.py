"""AsyncBatchsizeClient.recommend end to end against a live service with a worker."""

from __future__ import annotations

import asyncio

from batchsize_client import AsyncBatchsizeClient, Job, Recipe


def test_async_recommend_waits_with_progress_and_returns_the_typed_recipe(service_url: str) -> None:
    seen: list[Job] = []

    async def scenario() -> Recipe:
        async with AsyncBatchsizeClient(service_url) as client:
            assert "mlp" in [m["name"] for m in await client.models()]
            return await client.recommend(
                "mlp",
                config={"hidden_dims": [16]},
                dataset_size=2048,
                memory_budget_bytes=4 * 2**20,
                time_budget_s=3,
                force=True,
                poll_interval_s=0.1,
                on_progress=seen.append,
            )

    recipe = asyncio.run(scenario())
    assert isinstance(recipe, Recipe) and recipe.id == seen[-1].id
    assert seen[-1].status == "succeeded" and seen[-1].result is not None
    assert recipe.memory.budget_bytes == 4 * 2**20 and recipe.throughput
