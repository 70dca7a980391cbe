"""The README's "Using the recipe" examples, run as written against a live service (fast probe settings).

Each test defines the names its example leaves to the reader (a model, a dataset, a LightningModule),
executes the block and checks that the recipe reached the training loop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    """The python block after `<!-- example: NAME -->` in the README."""
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def run(name: str, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(example(name), f"README.md:{name}", "exec"), namespace)
    return namespace


def digits_like(n: int = 512) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=generator)
    y = (x[:, :10].argmax(1) + (torch.rand(n, generator=generator) < 0.1).long()) % 10
    return torch.utils.data.TensorDataset(x, y)


def test_plain_pytorch_example(fast_recommend: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ns = run("pytorch", {"model": model, "train_set": digits_like()})
    recipe = ns["recipe"]
    assert recipe.id and recipe.micro_batch_size >= 1
    assert ns["loader"].batch_size == recipe.micro_batch_size and ns["loader"].drop_last
    assert isinstance(ns["scheduler"], torch.optim.lr_scheduler.LRScheduler)
    lr = ns["optimizer"].param_groups[0]["lr"]
    assert 0 < lr <= recipe.learning_rate * (1 + 1e-9)


def test_lightning_example(fast_recommend: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    monkeypatch.chdir(tmp_path)

    class MyModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            self.lr = 1e-3
            self.warmup_steps = 0
            self.batch_sizes: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            x, y = batch
            self.batch_sizes.append(len(x))
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    class MyDataModule(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 32
            self.data = digits_like()

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    ns = run("lightning", {"MyModule": MyModule, "MyDataModule": MyDataModule})
    trainer, recipe = ns["trainer"], ns["callback"].recipe
    assert trainer.datamodule.batch_size == recipe.micro_batch_size
    assert trainer.accumulate_grad_batches == recipe.gradient_accumulation_steps
    assert trainer.lightning_module.lr == pytest.approx(recipe.learning_rate)
    assert trainer.lightning_module.warmup_steps == recipe.warmup_steps
    assert max(trainer.lightning_module.batch_sizes) == recipe.micro_batch_size  # the loop used it
    assert trainer.global_step >= 1


def test_hugging_face_example(fast_recommend: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (256, 16), generator=generator)
    train_set = [{"input_ids": t, "labels": t} for t in tokens]

    ns = run("huggingface", {"model": model, "train_set": train_set})
    recipe, args = ns["recipe"], ns["args"]
    assert recipe.id and recipe.micro_batch_size >= 1
    assert args.per_device_train_batch_size == recipe.micro_batch_size
    assert args.gradient_accumulation_steps == recipe.gradient_accumulation_steps
    assert args.learning_rate == pytest.approx(recipe.learning_rate)
    assert args.warmup_steps == recipe.warmup_steps and args.num_train_epochs == 1
