"""Several named input tensors that travel through the probe as one batch.

A model whose forward takes several inputs (`input_ids` + `attention_mask`, ...) gets its batch as a
`NamedInputs`: it slices, indexes, moves and measures like the one tensor of a single-input model
(`x[idx]`, `x[a:b]`, `len(x)`, `x.to(device)`, `x.device`), applied to every input together along the
first (example) dimension. So the memory search, the throughput ladder, the noise scale and the races,
written for `model(x[idx])`, feed every input unchanged; the model (`ExportedModule`) unpacks it into
keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


class NamedInputs(Mapping[str, torch.Tensor]):
    """{forward argument name: tensor}, every tensor `[N, ...]` with the same N; read-only mapping."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("NamedInputs needs at least one tensor")
        sizes = {name: (int(t.shape[0]) if t.ndim else None) for name, t in tensors.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"the inputs must share their first (example) dimension, got {sizes}")
        self._tensors = dict(tensors)

    # -- mapping

    def __getitem__(self, index: Any) -> Any:
        """A name gives that input; a slice or an index tensor selects the same examples of every input."""
        if isinstance(index, str):
            return self._tensors[index]
        if isinstance(index, int):
            raise TypeError("index NamedInputs with a slice or an index tensor (examples stay batched)")
        return NamedInputs({name: t[index] for name, t in self._tensors.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return int(next(iter(self._tensors.values())).shape[0])

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{n}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for n, t in self.items()
        )
        return f"NamedInputs({shown})"

    # -- what the probe does to a batch tensor

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors.values())).device

    def to(self, *args: Any, **kwargs: Any) -> NamedInputs:
        """Every input moved (`to(device)`); a dtype argument is not applied (each keeps its own)."""
        device = next((a for a in args if isinstance(a, str | torch.device)), kwargs.get("device"))
        if device is None:
            return self
        return NamedInputs({name: t.to(device) for name, t in self._tensors.items()})

    def unsqueeze(self, dim: int) -> NamedInputs:
        return NamedInputs({name: t.unsqueeze(dim) for name, t in self._tensors.items()})

    def contiguous(self) -> NamedInputs:
        return NamedInputs({name: t.contiguous() for name, t in self._tensors.items()})

    def clone(self) -> NamedInputs:
        return NamedInputs({name: t.clone() for name, t in self._tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


def rows(inputs: Any) -> int:
    """Examples in a batch: one tensor's first dimension, or a NamedInputs' shared one."""
    return len(inputs) if isinstance(inputs, NamedInputs) else int(inputs.shape[0])


Batch = torch.Tensor | NamedInputs  # a model's inputs: one tensor, or several by name
