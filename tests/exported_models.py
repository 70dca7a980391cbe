"""Small models exported with torch.export, and hostile archives built from them, for the upload tests.

Exporting takes seconds: each archive is made once per test session (cached) in a temporary folder.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_DIR = Path(tempfile.mkdtemp(prefix="batchsize-exported-"))


class TinyCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Linear on 1x8x8 images, 10 classes (the built-in digits fit it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


class TinyTransformerLM(nn.Module):
    """A one-block causal transformer over bytes that computes its own loss: forward(idx, targets)."""

    def __init__(self, vocab: int = 256, block: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(block, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab)
        self.heads = 2

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tokens(idx) + self.positions[:T]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class NaNModel(nn.Module):
    """Exports fine, but its loss is NaN: the dry run's training step must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


def _save(name: str, program: torch.export.ExportedProgram) -> Path:
    path = _DIR / f"{name}.pt2"
    torch.export.save(program, path)
    return path


@functools.cache
def cnn_archive() -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        TinyCNN().train(), (torch.randn(4, 1, 8, 8),), dynamic_shapes={"x": {0: batch}}
    )
    return _save("cnn", program)


@functools.cache
def transformer_archive() -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    idx = torch.randint(256, (4, 16))
    program = torch.export.export(
        TinyTransformerLM().train(),
        (idx, idx),
        dynamic_shapes={"idx": {0: batch}, "targets": {0: batch}},
    )
    return _save("transformer", program)


@functools.cache
def static_archive() -> Path:
    """A CNN exported without dynamic_shapes: its batch dimension is fixed at 4."""
    torch.manual_seed(0)
    return _save("static", torch.export.export(TinyCNN().train(), (torch.randn(4, 1, 8, 8),)))


@functools.cache
def nan_archive() -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(NaNModel().train(), (torch.randn(4, 4),), dynamic_shapes={"x": {0: batch}})
    return _save("nan", program)


class _CreatesMarker:
    """Unpickling this object creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a zip, replacing the entries whose path (after the root folder) is a key of `replace`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            relative = info.filename.split("/", 1)[1]
            dst.writestr(info, replace.get(relative, src.read(info)))
    return target


def pickled_weight_archive(marker: Path, target: Path) -> Path:
    """The CNN archive with its first weight stored as a pickle (`use_pickle: true`) that creates `marker`."""
    with zipfile.ZipFile(cnn_archive()) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"]))
    entry = config["config"][first]
    entry["use_pickle"] = True
    payload = io.BytesIO()
    pickle.dump(_CreatesMarker(marker), payload)
    return _rewrite(
        cnn_archive(),
        target,
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{entry['path_name']}": payload.getvalue(),
        },
    )


def pickled_sample_inputs_archive(marker: Path, target: Path) -> Path:
    """The CNN archive whose sample inputs are a pickle that creates `marker` (torch.export.load falls
    back to weights_only=False for them); weights and constants are clean, so inspection accepts it."""
    return _rewrite(
        cnn_archive(), target, {"data/sample_inputs/model.pt": pickle.dumps(_CreatesMarker(marker))}
    )


def zip_without_export_layout(target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("model/readme.txt", "not an exported program")
        archive.writestr("model/weights.bin", b"\0" * 64)
    return target


def _program_json(source: Path) -> dict:
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        return json.loads(archive.read(f"{root}/models/model.json"))


def rewritten_program_archive(target: Path, mutate, source: Path | None = None) -> Path:
    """The CNN archive (or `source`) with `mutate(program_json_dict)` applied to models/model.json."""
    source = source or cnn_archive()
    program = _program_json(source)
    mutate(program)
    return _rewrite(source, target, {"models/model.json": json.dumps(program).encode()})


def sympy_payload(marker: Path) -> str:
    """Python that creates `marker` when evaluated: what sympy.sympify would run."""
    return f"0*__import__('os').system('touch {marker}')"


def sympy_injection_archive(marker: Path, target: Path) -> Path:
    """The CNN archive (dynamic batch) whose first symbolic size evaluates `touch marker` in sympify."""
    text = json.dumps(_program_json(cnn_archive()))
    symbol = "Symbol('s77', positive=True, integer=True)"
    if symbol not in text:  # another torch names its batch symbol differently
        start = text.index("Symbol('s")
        symbol = text[start : text.index(")", start) + 1]
    injected = text.replace(symbol, f"{symbol} + {sympy_payload(marker)}", 1)
    assert injected != text
    return _rewrite(cnn_archive(), target, {"models/model.json": injected.encode()})


class Reshaper(nn.Module):
    """Reshapes by a dynamic size: its program holds compound symbolic expressions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.fc(x.reshape(b * 2, 6)).reshape(b, 12)[:, ::2] + (b // 2)


@functools.cache
def reshaping_archive() -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(Reshaper().train(), (torch.randn(4, 12),), dynamic_shapes={"x": {0: batch}})
    return _save("reshaper", program)
