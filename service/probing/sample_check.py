"""One validator for a data sample against the training task of the model it feeds.

A sample is arrays `x` (inputs, `[N, *input_shape]`) and `y` (targets); for a model whose forward takes
several inputs, one array per forward argument named as the argument (`input_ids`, `attention_mask`,
...) plus the target, `y` (or, for `model_returns_loss`, the forward's own target name, e.g.
`labels`). Every array has the N examples first. Arrays the model does not take are not used. What
the target must be follows from the declared loss, not from dtype rules of its own:

- `cross_entropy`: integer class ids in `[0, classes)`, shaped like the logits without their last
  dimension (`[N]` for a classifier, `[N, T]` per position for a sequence model); targets equal to
  the request's `ignore_index` (default -100, PyTorch's) are accepted and left out of the loss.
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

TARGET_NAMES = ("y", "labels", "label", "targets", "target")  # a target array's names, preferred first
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
    # Several inputs: [{"name", "shape", "dtype", "high", "fill"}] (ExportedConfig.inputs); None: one, `x`.
    inputs: tuple[Mapping[str, Any], ...] | None = None
    target_name: str | None = None  # model_returns_loss with several inputs: the forward's target name
    ignore_index: int = IGNORE_INDEX  # cross_entropy targets equal to it are left out of the loss

    @classmethod
    def for_model(
        cls,
        config: Any,
        *,
        input_shape: list[int],
        input_dtype: str,
        num_classes: int,
        ignore_index: int | None = None,
    ) -> Task:
        """The task of a zoo model (a classifier: cross_entropy over `num_classes`) or of an uploaded
        program (its config carries `loss` and the target spec inferred at upload). `ignore_index`:
        the request's, else the config's (an uploaded model's config carries the probe's), else -100."""
        if isinstance(config, Mapping):
            values: Mapping[str, Any] = config
        else:
            keys = (
                "loss", "target_shape", "target_dtype", "target_high", "input_high", "inputs", "target_name",
                "ignore_index",
            )  # fmt: skip
            values = {k: getattr(config, k) for k in keys if hasattr(config, k)}
        loss = values.get("loss")
        high = values.get("input_high")
        if ignore_index is None:
            ignore_index = int(values.get("ignore_index", IGNORE_INDEX))
        if loss is None:  # a zoo model
            return cls(
                "cross_entropy",
                tuple(input_shape),
                input_dtype,
                input_high=num_classes if _integer(input_dtype) else None,
                classes=num_classes,
                ignore_index=ignore_index,
            )
        target_dtype = str(values.get("target_dtype") or ("int64" if loss == "cross_entropy" else "float32"))
        inputs = values.get("inputs")
        return cls(
            str(loss),
            tuple(input_shape),
            input_dtype,
            input_high=int(high) if high else None,
            target_shape=tuple(values.get("target_shape") or ()),
            target_dtype=target_dtype,
            classes=(int(values.get("target_high") or 0) or None) if _integer(target_dtype) else None,
            inputs=tuple(dict(i) for i in inputs) if inputs else None,
            target_name=values.get("target_name"),
            ignore_index=ignore_index,
        )

    @property
    def input_names(self) -> list[str]:
        return [str(spec["name"]) for spec in self.inputs or ()]

    def expected_target(self) -> str:
        """What this task's loss needs of y, in words (for error messages)."""
        shape = "" if self.target_shape is None else f" shaped {list(self.target_shape)} per example"
        if self.loss in CLASSIFICATION_LOSSES:
            classes = f" in [0, {self.classes})" if self.classes else ""
            ignored = f"(or {self.ignore_index} to ignore)"
            return f"loss {self.loss} expects integer class ids{classes}{shape} {ignored}"
        if self.loss in REGRESSION_LOSSES:
            output = "" if self.target_shape is None else f": {list(self.target_shape)} per example"
            return f"loss {self.loss} expects float targets shaped like the model's output{output}"
        if self.inputs:
            arguments = ", ".join([*self.input_names, self.target_name or "target"])
            return f"the model's forward({arguments}) expects a {self.target_dtype} target{shape}"
        return f"the model's forward(x, target) expects a {self.target_dtype} target{shape}"


def _integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _shown(name: str, info: Mapping[str, Any]) -> str:
    return f"{name} has per-example shape {list(info['shape'])} and dtype {info['dtype']}"


# ------------------------------------------------------------------------------------ 1. arrays


def check_arrays(
    arrays: Mapping[str, Any], *, max_samples: int = DEFAULT_MAX_SAMPLES, ignore_index: int = IGNORE_INDEX
) -> dict[str, Any]:
    """Check that `arrays` (name -> tensor) is a usable sample; return its description:
    {name: {"shape", "dtype", "min"?, "max"?, "ignored"?}, ..., "examples"} (shapes per example;
    min/max of integer arrays, for targets besides the `ignored` ones equal to `ignore_index`).

    Either `x` and `y` (one input), or one array per forward argument plus a target named one of
    TARGET_NAMES. Raises ValueError naming the array and the problem."""
    if "x" in arrays:
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise ValueError(
                f"a data sample must hold arrays 'x' (inputs) and 'y' (targets); missing {missing}, "
                f"found {sorted(arrays)}"
            )
        names, targets = ["x", "y"], {"y"}
    else:
        targets = {name for name in arrays if name in TARGET_NAMES}
        names = list(arrays)
        if not targets or len(names) == len(targets):
            raise ValueError(
                "a data sample must hold arrays 'x' (inputs) and 'y' (targets), or one array per forward "
                "argument (e.g. 'input_ids', 'attention_mask') and the target "
                f"({' or '.join(TARGET_NAMES)}); found {sorted(arrays)}"
            )
    if "examples" in arrays:
        raise ValueError("an array may not be named 'examples'")
    description: dict[str, Any] = {}
    for name in names:
        description[name] = _describe(name, arrays[name], target=name in targets, ignore_index=ignore_index)
    counts = {name: int(arrays[name].shape[0]) for name in names}
    if len(set(counts.values())) > 1:
        if names == ["x", "y"]:
            raise ValueError(f"x has {counts['x']} examples but y has {counts['y']}")
        first = names[0]
        odd = next(n for n in names if counts[n] != counts[first])
        raise ValueError(
            f"array {odd!r} has {counts[odd]} examples (shape {list(arrays[odd].shape)}) but {first!r} has "
            f"{counts[first]}: all arrays must agree on the first (example) dimension"
        )
    n = counts[names[0]]
    if n > max_samples:
        raise ValueError(f"the data sample has {n} examples, over the limit of {max_samples}")
    description["examples"] = int(n)
    return description


def _describe(name: str, array: Any, *, target: bool, ignore_index: int) -> dict[str, Any]:
    """One array's description (see check_arrays); ValueError when it cannot be part of a sample."""
    import torch

    if not isinstance(array, torch.Tensor):
        raise ValueError(f"array {name!r} must be an array")
    named_input = not target and name != "x"
    if (array.dtype == torch.bool and not named_input) or array.is_complex():  # bool: masks only
        raise ValueError(f"array {name!r} must be numeric, got {array.dtype}")
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"the data sample is empty ({name} has shape {list(array.shape)})")
    if array.is_floating_point() and not bool(torch.isfinite(array).all()):
        raise ValueError(f"array {name!r} contains NaN or infinite values")
    info: dict[str, Any] = {"shape": list(array.shape[1:]), "dtype": str(array.dtype).removeprefix("torch.")}
    if not array.is_floating_point():
        kept = array.long() if array.dtype == torch.bool else array
        if target and bool((array == ignore_index).any()):  # targets a loss may ignore
            info["ignored"] = int((array == ignore_index).sum())
            if ignore_index != IGNORE_INDEX:
                info["ignore_index"] = ignore_index
            kept = array[array != ignore_index]
        info["min"], info["max"] = (int(kept.min()), int(kept.max())) if kept.numel() else (0, 0)
    return info


# --------------------------------------------------------------------------------- 2. description


def _target_name(arrays: Mapping[str, Any], task: Task) -> str | None:
    """Which array holds the targets: the forward's own target name (model_returns_loss), else the
    first of TARGET_NAMES present."""
    if task.target_name and task.target_name in arrays:
        return task.target_name
    return next((name for name in TARGET_NAMES if name in arrays), None)


def problem(description: Mapping[str, Any], task: Task) -> str | None:
    """Why a sample with this description cannot feed a model with this task, or None."""
    if task.inputs:
        return _problem_several(description, task)
    x, y = description.get("x"), description.get("y")
    if not x or not y:
        if not x and description.get("examples"):
            inputs = sorted(k for k in description if k != "examples" and k not in TARGET_NAMES)
            return (
                f"the model takes one input, array 'x' ({task.input_dtype}, per-example shape "
                f"{list(task.input_shape)}), and the target 'y'; the sample holds {inputs} and its target"
            )
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
    return _target_problem("y", y, task)


def _problem_several(description: Mapping[str, Any], task: Task) -> str | None:
    """problem() for a model whose forward takes several named inputs."""
    names = task.input_names
    held = sorted(k for k in description if k != "examples")
    takes = f"the model's forward takes {', '.join(names)}"
    if not any(name in description for name in names):
        return (
            f"{takes}: the sample needs one array per input, named as the forward's arguments, plus the "
            f"target; it holds {held}"
        )
    for spec in task.inputs or ():
        name = str(spec["name"])
        info = description.get(name)
        if info is None:
            return f"the sample has no array {name!r} ({takes}; the sample holds {held})"
        if list(info["shape"]) != list(spec["shape"]):
            wanted = f"per-example shape {list(spec['shape'])} ({spec['dtype']})"
            return f"{_shown(name, info)}; the model takes {wanted}"
        if _integer(str(spec["dtype"])) and "min" not in info:
            return f"{_shown(name, info)}; the model takes integers ({spec['dtype']})"
        high = spec.get("high")
        if spec.get("fill") != "ones" and high and "min" in info and (info["min"] < 0 or info["max"] >= high):
            return (
                f"{name} holds values in [{info['min']}, {info['max']}] ({_shown(name, info)}); the model "
                f"takes {name} in [0, {high})"
            )
    target = _target_name(description, task)
    if target is None or target in names:
        wanted = task.target_name if task.loss == "model_returns_loss" and task.target_name else "y"
        return (
            f"the sample has no target array: expected {wanted!r} ({task.expected_target()}); it holds {held}"
        )
    return _target_problem(target, description[target], task)


def _target_problem(name: str, y: Mapping[str, Any], task: Task) -> str | None:
    """Why this target array cannot feed the task's loss, or None."""
    integer_y = "min" in y
    if task.target_shape is not None and list(y["shape"]) != list(task.target_shape):
        one_output = task.loss in REGRESSION_LOSSES and list(task.target_shape) == [1] and y["shape"] == []
        if not one_output:
            return f"{_shown(name, y)}; {task.expected_target()}"
    if task.loss in CLASSIFICATION_LOSSES:
        if not integer_y:
            return f"{_shown(name, y)}; {task.expected_target()}: labels {name} must be integers"
        described_with = y.get("ignore_index", IGNORE_INDEX)  # what the stored min/max left out
        if described_with != task.ignore_index and y.get("ignored"):
            return (
                f"{name} holds {described_with} in {y['ignored']} targets, but training.ignore_index is "
                f"{task.ignore_index}: {described_with} is then not a class id"
            )
        # Described with another ignore_index, the stored range may include this one: the check on the
        # data itself (at submission and at probe start) settles it.
        low_known = described_with == task.ignore_index or y["min"] != task.ignore_index
        high_known = described_with == task.ignore_index or y["max"] != task.ignore_index
        if task.classes and ((high_known and y["max"] >= task.classes) or (low_known and y["min"] < 0)):
            return (
                f"{name} holds class ids in [{y['min']}, {y['max']}] but the model has {task.classes} "
                f"classes: labels {name} must lie in [0, {task.classes})"
            )
    elif task.loss in REGRESSION_LOSSES:
        pass  # integer targets are read as floats: counts and ranks are regression targets too
    elif task.target_dtype is not None and _integer(task.target_dtype) != integer_y:
        return f"{_shown(name, y)}; {task.expected_target()}"
    return None


# ------------------------------------------------------------------------------ 3. tensors + step


def prepare(x: Any, y: Any, task: Task, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> tuple[Any, Any]:
    """Check the tensors against the task and return them cast to what the model and loss take:
    x to the input dtype, y to int64 (class ids) or float32 (regression) or the target dtype."""
    return prepare_arrays({"x": x, "y": y}, task, max_samples=max_samples)


def prepare_arrays(
    arrays: Mapping[str, Any], task: Task, *, max_samples: int = DEFAULT_MAX_SAMPLES
) -> tuple[Any, Any]:
    """(inputs, targets) of a sample checked against the task: inputs one tensor cast to the input
    dtype, or a NamedInputs of every input the model takes (each cast to its dtype); targets int64
    class ids (those equal to the task's ignore_index become -100, what every cross_entropy here
    ignores), float32 regression targets, or the exported target's dtype."""
    import torch

    from service.probing.inputs import NamedInputs

    found = problem(check_arrays(arrays, max_samples=max_samples, ignore_index=task.ignore_index), task)
    if found:
        raise ValueError(found)
    if task.inputs:
        x: Any = NamedInputs(
            {str(s["name"]): arrays[s["name"]].to(getattr(torch, str(s["dtype"]))) for s in task.inputs}
        )
        y = arrays[_target_name(arrays, task) or "y"]  # problem() found one
    else:
        x, y = arrays["x"].to(getattr(torch, task.input_dtype)), arrays["y"]
    if task.loss in CLASSIFICATION_LOSSES:
        y = y.to(torch.int64)
        if task.ignore_index != IGNORE_INDEX:
            y = torch.where(y == task.ignore_index, torch.full_like(y, IGNORE_INDEX), y)
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
    arrays = [*(x.items() if isinstance(x, Mapping) else [("x", x)]), ("y", y)]
    shown = ", ".join(
        f"{name} {str(a.dtype).removeprefix('torch.')} {list(a.shape[1:])}" for name, a in arrays
    )
    try:
        outputs = model(xs)
        if isinstance(outputs, torch.Tensor):
            _check_output(outputs, ys, task)
        loss = loss_fn(outputs, ys)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("the loss is not a scalar")
        all_ignored = task.loss in CLASSIFICATION_LOSSES and bool((ys == IGNORE_INDEX).all())
        if not math.isfinite(float(loss.detach())) and not all_ignored:  # nothing counted: 0/0
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
