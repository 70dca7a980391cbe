"""One validator for a data sample against the training task of the model it feeds.

A sample is arrays `x` (inputs, `[N, *input_shape]`) and `y` (targets). What `y` must be follows from
the declared loss, not from dtype rules of its own:

- `cross_entropy`: integer class ids in `[0, classes)`, shaped like the logits without their last
  dimension (`[N]` for a classifier, `[N, T]` per position for a sequence model); the value -100 is
  PyTorch's default `ignore_index` and is accepted (that target is left out of the loss).
- `mse`, `l1`, `huber`: float targets shaped like the model's output (`[N, 1]` or `[N]` for one
  output, `[N, K]` for K outputs).
- `model_returns_loss`: whatever `forward(x, y)` accepts: the dtype family and per-example shape of
  the target the program was exported with.

Three levels, one set of rules and messages (each names the array, its shape and dtype, and what the
loss expected):

1. `check_arrays(arrays)`: readable as a sample at all (x and y present, numeric, non-empty, finite,
   as many examples in both). At upload, before any model is known; returns the stored description.
2. `problem(description, task)`: the stored description against a model's task, without data. When a
   recommendation names a model and a sample (a 422 at submission).
3. `prepare(x, y, task)` + `dry_step(model, loss, x, y, task)`: the tensors themselves, cast to what
   the model takes, then one forward, loss and backward on a slice of the sample in the probe. This
   is what settles it: a target the model's output and loss cannot use fails here, named.

Pure torch (imported lazily): the service process uses levels 1 and 2 on stored descriptions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CLASSIFICATION_LOSSES = ("cross_entropy",)
REGRESSION_LOSSES = ("mse", "l1", "huber")
IGNORE_INDEX = -100  # F.cross_entropy's default: such targets do not count
DEFAULT_MAX_SAMPLES = 100_000
DRY_STEP_ROWS = 4


@dataclass(frozen=True)
class Task:
    """What the model takes and what its loss needs. `target_shape` None: not known before the model
    runs (zoo classifiers: the logits tell); `classes` None: targets are not class ids."""

    loss: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    input_high: int | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    classes: int | None = None

    @classmethod
    def for_model(cls, config: Any, *, input_shape: list[int], input_dtype: str, num_classes: int) -> Task:
        """The task of a zoo model (a classifier: cross_entropy over `num_classes`) or of an uploaded
        program (its config carries `loss` and the target spec inferred at upload)."""
        if isinstance(config, Mapping):
            values: Mapping[str, Any] = config
        else:
            keys = ("loss", "target_shape", "target_dtype", "target_high", "input_high")
            values = {k: getattr(config, k) for k in keys if hasattr(config, k)}
        loss = values.get("loss")
        high = values.get("input_high")
        if loss is None:  # a zoo model
            return cls(
                "cross_entropy",
                tuple(input_shape),
                input_dtype,
                input_high=num_classes if _integer(input_dtype) else None,
                classes=num_classes,
            )
        target_dtype = str(values.get("target_dtype") or ("int64" if loss == "cross_entropy" else "float32"))
        return cls(
            str(loss),
            tuple(input_shape),
            input_dtype,
            input_high=int(high) if high else None,
            target_shape=tuple(values.get("target_shape") or ()),
            target_dtype=target_dtype,
            classes=(int(values.get("target_high") or 0) or None) if _integer(target_dtype) else None,
        )

    def expected_target(self) -> str:
        """What this task's loss needs of y, in words (for error messages)."""
        shape = "" if self.target_shape is None else f" shaped {list(self.target_shape)} per example"
        if self.loss in CLASSIFICATION_LOSSES:
            classes = f" in [0, {self.classes})" if self.classes else ""
            return f"loss {self.loss} expects integer class ids{classes}{shape} (or {IGNORE_INDEX} to ignore)"
        if self.loss in REGRESSION_LOSSES:
            output = "" if self.target_shape is None else f": {list(self.target_shape)} per example"
            return f"loss {self.loss} expects float targets shaped like the model's output{output}"
        return f"the model's forward(x, target) expects a {self.target_dtype} target{shape}"


def _integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _shown(name: str, info: Mapping[str, Any]) -> str:
    return f"{name} has per-example shape {list(info['shape'])} and dtype {info['dtype']}"


# ------------------------------------------------------------------------------------ 1. arrays


def check_arrays(arrays: Mapping[str, Any], *, max_samples: int = DEFAULT_MAX_SAMPLES) -> dict[str, Any]:
    """Check that `arrays` (name -> tensor) is a usable sample; return its description:
    {"x": {"shape", "dtype", "min"?, "max"?}, "y": {..., "ignored"?}, "examples"} (shapes per example;
    min/max of integer arrays, for y besides the `ignored` targets equal to IGNORE_INDEX). Raises
    ValueError naming the array and the problem."""
    import torch

    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(
            f"a data sample must hold arrays 'x' (inputs) and 'y' (targets); missing {missing}, "
            f"found {sorted(arrays)}"
        )
    description: dict[str, Any] = {}
    for name in ("x", "y"):
        array = arrays[name]
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"array {name!r} must be an array")
        if array.dtype == torch.bool or array.is_complex():
            raise ValueError(f"array {name!r} must be numeric, got {array.dtype}")
        if array.ndim == 0 or array.shape[0] == 0:
            raise ValueError(f"the data sample is empty ({name} has shape {list(array.shape)})")
        if array.is_floating_point() and not bool(torch.isfinite(array).all()):
            raise ValueError(f"array {name!r} contains NaN or infinite values")
        dtype = str(array.dtype).removeprefix("torch.")
        info: dict[str, Any] = {"shape": list(array.shape[1:]), "dtype": dtype}
        if not array.is_floating_point():
            kept = array
            if name == "y" and bool((array == IGNORE_INDEX).any()):  # targets a loss may ignore
                info["ignored"] = int((array == IGNORE_INDEX).sum())
                kept = array[array != IGNORE_INDEX]
            info["min"], info["max"] = (int(kept.min()), int(kept.max())) if kept.numel() else (0, 0)
        description[name] = info
    n, m = arrays["x"].shape[0], arrays["y"].shape[0]
    if n != m:
        raise ValueError(f"x has {n} examples but y has {m}")
    if n > max_samples:
        raise ValueError(f"the data sample has {n} examples, over the limit of {max_samples}")
    description["examples"] = int(n)
    return description


# --------------------------------------------------------------------------------- 2. description


def problem(description: Mapping[str, Any], task: Task) -> str | None:
    """Why a sample with this description cannot feed a model with this task, or None."""
    x, y = description.get("x"), description.get("y")
    if not x or not y:
        return None  # nothing stored to check: the probe checks the data itself
    if list(x["shape"]) != list(task.input_shape):
        return (
            f"{_shown('x', x)}; the model takes per-example shape {list(task.input_shape)} "
            f"({task.input_dtype})"
        )
    integer_x = "min" in x
    if _integer(task.input_dtype):
        high = task.input_high
        if not integer_x:
            return f"{_shown('x', x)}; the model takes integer token ids ({task.input_dtype})"
        if x["min"] < 0 or (high and x["max"] >= high):
            return f"x holds token ids in [{x['min']}, {x['max']}]; the model takes token ids in [0, {high})"
    integer_y = "min" in y
    if task.target_shape is not None and list(y["shape"]) != list(task.target_shape):
        one_output = task.loss in REGRESSION_LOSSES and list(task.target_shape) == [1] and y["shape"] == []
        if not one_output:
            return f"{_shown('y', y)}; {task.expected_target()}"
    if task.loss in CLASSIFICATION_LOSSES:
        if not integer_y:
            return f"{_shown('y', y)}; {task.expected_target()}: labels y must be integers"
        if task.classes and (y["max"] >= task.classes or y["min"] < 0):
            return (
                f"y holds class ids in [{y['min']}, {y['max']}] but the model has {task.classes} classes: "
                f"labels y must lie in [0, {task.classes})"
            )
    elif task.loss in REGRESSION_LOSSES:
        pass  # integer targets are read as floats: counts and ranks are regression targets too
    elif task.target_dtype is not None and _integer(task.target_dtype) != integer_y:
        return f"{_shown('y', y)}; {task.expected_target()}"
    return None


# ------------------------------------------------------------------------------ 3. tensors + step


def prepare(x: Any, y: Any, task: Task, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> tuple[Any, Any]:
    """Check the tensors against the task and return them cast to what the model and loss take:
    x to the input dtype, y to int64 (class ids) or float32 (regression) or the target dtype."""
    import torch

    found = problem(check_arrays({"x": x, "y": y}, max_samples=max_samples), task)
    if found:
        raise ValueError(found)
    x = x.to(getattr(torch, task.input_dtype))
    if task.loss in CLASSIFICATION_LOSSES:
        y = y.to(torch.int64)
    elif task.loss in REGRESSION_LOSSES:
        y = y.to(torch.float32)
        if task.target_shape is not None and list(y.shape[1:]) != list(task.target_shape):
            y = y.reshape(len(y), *task.target_shape)  # [N] for a model with one output: [N, 1]
    elif task.target_dtype is not None:
        y = y.to(getattr(torch, task.target_dtype))
    return x, y


def dry_step(model: Any, loss_fn: Callable[[Any, Any], Any], x: Any, y: Any, task: Task) -> None:
    """One forward, loss and backward on the first rows of the sample; ValueError naming the arrays
    and what the loss expected when the model's output and the targets do not fit together. The
    gradients it leaves are cleared and the buffers it changed restored."""
    import torch

    xs, ys = x[:DRY_STEP_ROWS], y[:DRY_STEP_ROWS]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # e.g. BatchNorm statistics
    shown = ", ".join(
        f"{name} {str(a.dtype).removeprefix('torch.')} {list(a.shape[1:])}"
        for name, a in (("x", x), ("y", y))
    )
    try:
        outputs = model(xs)
        if isinstance(outputs, torch.Tensor):
            _check_output(outputs, ys, task)
        loss = loss_fn(outputs, ys)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("the loss is not a scalar")
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"the loss is {float(loss.detach())}")
        loss.backward()
    except Exception as exc:  # model code can raise anything; the client gets it named
        text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        raise ValueError(
            f"a training step on the first {len(xs)} examples of the sample failed ({shown} per example; "
            f"{task.expected_target()}): {text[:500]}"
        ) from exc
    finally:
        for parameter in model.parameters():
            parameter.grad = None
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])


def _check_output(outputs: Any, ys: Any, task: Task) -> None:
    """The shape agreement the loss functions themselves would broadcast over or report obscurely."""
    out = list(outputs.shape[1:])
    target = list(ys.shape[1:])
    if task.loss in REGRESSION_LOSSES and out != target:
        raise ValueError(f"the model's output is {out} per example but y is {target}")
    if task.loss in CLASSIFICATION_LOSSES and outputs.ndim >= 2:
        if out[:-1] != target:
            raise ValueError(
                f"the model's logits are {out} per example (classes last), so y must be {out[:-1]}, "
                f"got {target}"
            )
        valid = ys[ys != IGNORE_INDEX]
        if valid.numel() and int(valid.max()) >= out[-1]:
            raise ValueError(f"y holds class id {int(valid.max())} but the model has {out[-1]} classes")
