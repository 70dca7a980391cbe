"""A small text classifier with two named inputs (input_ids + attention_mask), exported once per test
session, and token data for it: shared by the multi-input tests."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB, SEQ, CLASSES = 50, 8, 4
_DIR = Path(tempfile.mkdtemp(prefix="batchsize-multi-"))


class TextClassifier(nn.Module):
    """Embedding, masked mean pooling, linear head: forward(input_ids, attention_mask) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class TextClassifierWithLoss(TextClassifier):
    """The same, computing its own loss from `labels` (Hugging Face style)."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return nn.functional.cross_entropy(super().forward(input_ids, attention_mask), labels)


def _export(model: nn.Module, names: list[str], path: Path) -> Path:
    torch.manual_seed(0)
    example = {
        "input_ids": torch.randint(0, VOCAB, (4, SEQ)),
        "attention_mask": torch.ones(4, SEQ, dtype=torch.long),
        "labels": torch.randint(0, CLASSES, (4,)),
    }
    batch = torch.export.Dim("batch")
    kwargs = {name: example[name] for name in names}
    program = torch.export.export(model.train(), (), kwargs, dynamic_shapes={n: {0: batch} for n in names})
    torch.export.save(program, str(path))
    return path


@functools.cache
def classifier_archive() -> Path:
    return _export(TextClassifier(), ["input_ids", "attention_mask"], _DIR / "classifier.pt2")


@functools.cache
def own_loss_archive() -> Path:
    return _export(TextClassifierWithLoss(), ["input_ids", "attention_mask", "labels"], _DIR / "own_loss.pt2")


def text_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token sequences with a padded tail; the class is the first token's residue (learnable)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, SEQ))
    lengths = rng.integers(2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "y": ids[:, 0] % CLASSES}
