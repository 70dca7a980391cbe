"""Turn the user's own `nn.Module` and data into what the service takes: a `torch.export` archive (.pt2)
with a dynamic batch dimension, and a data sample (.npz with arrays `x` and `y`; for a model with
several inputs, one array per forward argument, e.g. `input_ids` and `attention_mask`, plus the target:
`y`, or the forward's own target argument such as `labels` with loss=model_returns_loss).

Imports torch and numpy; `import batchsize_client` does not import this module until it is used.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchsize_client.errors import ExportError

LOSSES = ("cross_entropy", "mse", "model_returns_loss")
TARGET_KEYS = ("labels", "label", "targets", "target", "y")
DEFAULT_SAMPLE_EXAMPLES = 4096


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised by the torch-free install test
        raise ExportError(
            "recommend(model, ...) needs torch: pip install 'batchsize-client[torch]'", code="torch_missing"
        ) from None
    return torch


@dataclass
class ExportedModel:
    """An exported model and what the upload needs to know about it."""

    path: Path
    input_names: list[str]  # the forward's argument names, in order (the target too, when it takes one)
    batch_size: int  # of the example
    declared: dict[str, Any] = field(default_factory=dict)  # upload form fields: input/target specs
    target_name: str | None = None  # loss=model_returns_loss: the argument that takes the target

    @property
    def model_inputs(self) -> list[str]:
        """The inputs a data sample must hold (the target aside)."""
        return [name for name in self.input_names if name != self.target_name]


# ----------------------------------------------------------------------------------------- inputs


def named_inputs(model: Any, example_inputs: Any) -> dict[str, Any]:
    """{argument name: tensor} for the model's forward, from a tensor, a tuple/list (positional) or a
    dict (keyword), in the forward's parameter order."""
    torch = _torch()
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str | bytes):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ExportError(
            f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
            f"{type(example_inputs).__name__}",
            code="invalid_inputs",
        )
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ExportError(
            f"example_inputs do not fit {type(model).__name__}.forward: {exc}", code="invalid_inputs"
        ) from None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ExportError(
                f"{type(model).__name__}.forward takes *{name}: give the inputs by their own names "
                "(a dict) or export a module whose forward names its arguments",
                code="invalid_inputs",
            )
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"input {name!r} is a {type(value).__name__}, not a tensor", code="invalid_inputs"
            )
        named[name] = value
    if not named:
        raise ExportError("example_inputs is empty", code="invalid_inputs")
    return named


def batch_size_of(named: Mapping[str, Any]) -> int:
    """The example's batch size: the first dimension every input shares."""
    sizes = {name: (t.shape[0] if t.ndim else None) for name, t in named.items()}
    if any(size is None for size in sizes.values()):
        scalars = [name for name, size in sizes.items() if size is None]
        raise ExportError(
            f"inputs {scalars} are scalars: every input needs a batch dimension first", code="invalid_inputs"
        )
    if len(set(sizes.values())) != 1:
        raise ExportError(
            f"the inputs' first dimensions differ ({sizes}): every input must have the batch first",
            code="invalid_inputs",
        )
    return int(next(iter(sizes.values())))


def _at_least_two(named: dict[str, Any]) -> dict[str, Any]:
    """torch.export specialises a dimension of size 1: an example batch of one is repeated to two."""
    if batch_size_of(named) >= 2:
        return named
    return {name: t.expand(2, *t.shape[1:]).clone() for name, t in named.items()}


# ----------------------------------------------------------------------------------------- export


class _Outputs:
    """Makes a model's output something the service trains: a tensor (logits or prediction) or, with
    loss=model_returns_loss, the loss; from HF-style outputs (`.loss`, `.logits`), dicts and tuples."""

    def __init__(self, loss: str) -> None:
        self.loss = loss

    def __call__(self, out: Any) -> Any:
        torch = _torch()
        if isinstance(out, torch.Tensor):
            return out
        key = "loss" if self.loss == "model_returns_loss" else "logits"
        if isinstance(out, Mapping) and out.get(key) is not None:
            return out[key]
        if getattr(out, key, None) is not None:
            return getattr(out, key)
        if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        return out


def _wrapper(model: Any, names: list[str], loss: str) -> Any:
    """A module whose forward has the model's argument names and returns one tensor."""
    torch = _torch()
    outputs = _Outputs(loss)

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return outputs(self.model(*args, **kwargs))

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return Exported.forward(self, *args, **kwargs)

    # torch.export names the program's inputs after the signature it sees: the model's own names.
    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    named_type = type(f"Exported{type(model).__name__}", (Exported,), {"forward": forward})
    return named_type()


@contextlib.contextmanager
def _train_mode_on_cpu(model: Any) -> Iterator[Any]:
    """The model in train mode on the CPU (a copy when it lives elsewhere); its mode restored after."""
    torch = _torch()
    devices = {p.device.type for p in itertools.chain(model.parameters(), model.buffers())}
    target = model if devices <= {"cpu"} else copy.deepcopy(model).to(torch.device("cpu"))
    was_training = model.training
    target.train()
    try:
        yield target
    finally:
        model.train(was_training)


def export_model(
    model: Any,
    example_inputs: Any,
    path: str | Path,
    *,
    loss: str,
    input_high: int | None = None,
) -> ExportedModel:
    """Export `model` in train mode on the CPU with a dynamic batch dimension (found from the example:
    the first dimension every input shares) and save it to `path`.

    Inputs keep the forward's argument names (positional or keyword). Outputs that are not one tensor
    (HF `ModelOutput`, dicts, tuples) are reduced to the loss (loss=model_returns_loss) or the logits.
    Raises ExportError saying what could not be exported and what to do.
    """
    torch = _torch()
    if loss not in LOSSES:
        raise ExportError(f"loss must be one of {list(LOSSES)}, got {loss!r}", code="invalid_inputs")
    named = _at_least_two({k: v.detach().cpu() for k, v in named_inputs(model, example_inputs).items()})
    names = list(named)
    target_name = _target_argument(names, loss)
    batch = torch.export.Dim("batch")
    with _train_mode_on_cpu(model) as cpu_model:
        module = _wrapper(cpu_model, names, loss)
        try:
            program = torch.export.export(
                module, (), dict(named), dynamic_shapes={n: {0: batch} for n in names}
            )
        except Exception as exc:  # torch.export raises many types (UserError, Unsupported, ...)
            raise _export_problem(model, exc) from exc
    path = Path(path)
    torch.export.save(program, str(path))
    declared: dict[str, Any] = {}
    first = named[names[0]]
    if not first.is_floating_point() and first.dtype != torch.bool:
        high = input_high or _vocabulary(model) or int(first.max()) + 1
        declared["input"] = {"high": int(high)}
    if target_name is not None:
        target = named[target_name]
        if not target.is_floating_point() and target.dtype != torch.bool:
            declared["target"] = {"high": int(_target_bound(model, target, input_high))}
    return ExportedModel(
        path=path,
        input_names=names,
        batch_size=batch_size_of(named),
        declared=declared,
        target_name=target_name,
    )


def _target_argument(names: list[str], loss: str) -> str | None:
    """The argument that takes the target (model_returns_loss: the one named like a target, else the
    last), None for a loss computed outside the model; ExportError for inputs that cannot be right."""
    targets = [name for name in names if name in TARGET_KEYS]  # the service picks the target alike
    if loss != "model_returns_loss":
        if targets:
            raise ExportError(
                f"the example gives {', '.join(names)}: {targets[0]!r} looks like the target, but with "
                f"loss={loss} the loss is computed outside the model. Leave the target out of "
                "example_inputs, or use loss=model_returns_loss when forward computes the loss",
                code="invalid_inputs",
            )
        return None
    if len(names) < 2:
        raise ExportError(
            f"loss=model_returns_loss needs forward(inputs..., target) returning the loss, but the example "
            f"gives only {', '.join(names)}: include the target (e.g. labels) in example_inputs",
            code="invalid_inputs",
        )
    return targets[0] if targets else names[-1]


def _target_bound(model: Any, target: Any, input_high: int | None) -> int:
    """The exclusive bound of integer targets: a Hugging Face classifier's num_labels, else the
    vocabulary (language-model labels are next-token ids), else the example's largest value + 1."""
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None)
    if "Classification" in type(model).__name__ and isinstance(labels, int) and labels > 0:
        return labels
    return int(input_high or _vocabulary(model) or int(target.max()) + 1)


def _vocabulary(model: Any) -> int | None:
    """The exclusive bound of integer inputs: HF config's vocab_size, else the first embedding's size."""
    torch = _torch()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings)
    return None


def _export_problem(model: Any, exc: BaseException) -> ExportError:
    text = f"{type(exc).__name__}: {exc}".strip()
    first_lines = "\n".join(text.splitlines()[:12])
    name = type(model).__name__
    if "batch" in text and (
        "specializ" in text.lower() or "Constraints violated" in text or "must be" in text
    ):
        return ExportError(
            f"{name}'s code fixes the batch size (e.g. x.view(32, -1) or a loop over the batch), so its "
            "batch dimension cannot be exported as dynamic. Use x.flatten(1) or x.view(x.shape[0], -1) "
            f"instead.\n{first_lines}",
            code="static_batch_dimension",
        )
    return ExportError(
        f"torch.export could not export {name} in train mode: {first_lines}\nCommon causes: Python control "
        "flow on tensor values (use torch.where / torch.cond), calls into numpy or other libraries inside "
        "forward, or non-tensor inputs. torch.export.draft_export(model, args) lists every problem.",
        code="export_failed",
    )


# ----------------------------------------------------------------------------------------- sample


def _as_numpy(value: Any) -> Any:
    import numpy as np

    torch = _torch()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _split_item(
    item: Any, input_names: Sequence[str], target_name: str | None = None
) -> tuple[dict[str, Any], Any]:
    """({input name: value}, target) of one dataset item or batch: dicts keyed by the inputs' names and
    the target (`target_name`, else labels/label/targets/target/y), (inputs..., target) tuples (for one
    input also (x, y)), or ({inputs}, target) pairs."""
    if isinstance(item, Mapping):
        keys = [target_name] if target_name else []
        y = next((item[k] for k in (*keys, *TARGET_KEYS) if k in item and item[k] is not None), None)
        inputs = {name: item.get(name) for name in input_names}
        if len(input_names) == 1 and inputs[input_names[0]] is None:
            inputs = {input_names[0]: item.get("x")}
        missing = [name for name, value in inputs.items() if value is None]
        if missing or y is None:
            wanted = ", ".join(repr(n) for n in input_names) + (" (or 'x')" if len(input_names) == 1 else "")
            raise ExportError(
                f"dataset items are dicts with keys {sorted(item)}: need {wanted} and the target, one of "
                f"{list(dict.fromkeys([*keys, *TARGET_KEYS]))}",
                code="invalid_dataset",
            )
        return inputs, y
    if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], Mapping):
        inputs, y = _split_item({**item[0], "__target__": item[1]}, input_names, "__target__")
        return inputs, y
    if isinstance(item, Sequence) and len(item) == len(input_names) + 1:
        return dict(zip(input_names, item[:-1], strict=True)), item[-1]
    if isinstance(item, Sequence) and len(item) >= 2 and len(input_names) == 1:
        return {input_names[0]: item[0]}, item[1]
    raise ExportError(
        f"dataset items must be dicts, ({', '.join(input_names)}, target) tuples or (inputs, target) "
        f"pairs, got {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, Sequence) else ""),
        code="invalid_dataset",
    )


def sample_arrays(
    dataset: Any,
    input_names: Sequence[str],
    *,
    max_examples: int = DEFAULT_SAMPLE_EXAMPLES,
    target_name: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Up to `max_examples` examples as numpy arrays ({input name: array}, target), from a DataLoader
    (batches), a Dataset (items), or an (inputs, target) pair of tensors/arrays (inputs: one tensor or
    a dict of them)."""
    import numpy as np

    torch = _torch()
    names = list(input_names)
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], tuple):
        inputs, y = _split_item(dataset, names, target_name)
        return (
            {name: _as_numpy(value)[:max_examples] for name, value in inputs.items()},
            _as_numpy(y)[:max_examples],
        )
    parts: dict[str, list[Any]] = {name: [] for name in names}
    ys: list[Any] = []
    count = 0
    if isinstance(dataset, torch.utils.data.DataLoader):
        for batch in dataset:
            inputs, y = _split_item(batch, names, target_name)
            for name, value in inputs.items():
                parts[name].append(_as_numpy(value))
            ys.append(_as_numpy(y))
            count += len(ys[-1])
            if count >= max_examples:
                break
    else:
        try:
            size = len(dataset)
        except TypeError:
            raise ExportError(
                "dataset must be a DataLoader, a map-style Dataset (with len) or an (inputs, target) pair",
                code="invalid_dataset",
            ) from None
        generator = np.random.default_rng(0)
        indices = sorted(generator.choice(size, size=min(size, max_examples), replace=False).tolist())
        for index in indices:
            inputs, y = _split_item(dataset[index], names, target_name)
            for name, value in inputs.items():
                parts[name].append(_as_numpy(value)[None])
            ys.append(np.asarray(_as_numpy(y))[None])
    if not ys:
        raise ExportError("the dataset is empty", code="invalid_dataset")
    arrays = {name: np.concatenate(values)[:max_examples] for name, values in parts.items()}
    return arrays, np.concatenate(ys)[:max_examples]


def pack_sample(
    dataset: Any,
    input_names: Sequence[str],
    path: str | Path,
    *,
    max_examples: int = DEFAULT_SAMPLE_EXAMPLES,
    target_name: str | None = None,
) -> Path:
    """Write a data sample of up to `max_examples` examples to `path` (.npz): `x` and `y` for a model
    with one input; one array per input, named as the input, plus the target (`target_name`, the
    forward's target argument, else `y`) for several. Float inputs are written as float32."""
    import numpy as np

    inputs, y = sample_arrays(dataset, input_names, max_examples=max_examples, target_name=target_name)
    for name, array in inputs.items():
        if array.dtype.kind == "f" and array.dtype != np.float32:
            inputs[name] = array.astype(np.float32)
    if len(inputs) == 1:
        arrays = {"x": next(iter(inputs.values())), "y": y}
    else:
        arrays = {**inputs, (target_name or "y"): y}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def dataset_size(dataset: Any) -> int | None:
    """Training examples per epoch, when the dataset says (len of a Dataset or a DataLoader's dataset)."""
    torch = _torch()
    target = dataset.dataset if isinstance(dataset, torch.utils.data.DataLoader) else dataset
    if isinstance(target, tuple) and len(target) == 2:
        target = target[0]
    try:
        return len(target)
    except TypeError:
        return None
