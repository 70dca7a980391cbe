"""A loaded export program trained like a zoo model: the training task, the losses, the ModelSpec.

The training task comes with the upload: `loss` is `cross_entropy` (logits `[B, ..., C]`, integer
targets `[B, ...]`), `mse`, `l1` or `huber` (float targets shaped like the output) or
`model_returns_loss` (`forward(x, target)` returns the scalar loss, or a tuple/dict whose first
item/"loss" is). Inputs and targets are synthesised from the program's own input specs
(`input`/`target`: per-sample `shape`, `dtype`, and `high`, the exclusive bound of integer values such
as token ids); `infer_config` checks the declaration against the program and completes it.

Several inputs (`forward(input_ids, attention_mask)`, positional or keyword; with `model_returns_loss`
the target is the input named `labels`/`label`/`targets`/`target`/`y`, else the last one): the config's
`inputs` lists each by its forward argument name with its per-sample shape, dtype, `high` and `fill`,
and the probe feeds them together as a `NamedInputs` batch (keyword arguments). Synthesised inputs
assume: an integer input that indexes an embedding holds ids in [0, that embedding's rows) (the
vocabulary, the type vocabulary, the positions); an input whose name contains `mask` is all ones
(attend everywhere: the most memory a mask can cost); other integer inputs take the declared
`input.high` (or `num_classes`); float inputs are standard normal noise. The sequence length (every
per-sample dimension) is the one the program was exported with.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelSpec, randint, randn
from service.probing.exported.archive import ArchiveError
from service.probing.exported.loader import load_program
from service.probing.inputs import NamedInputs
from service.probing.spec import ProbeError, ProbeSpec

LOSSES = ("cross_entropy", "mse", "l1", "huber", "model_returns_loss")
REGRESSION_LOSSES = ("mse", "l1", "huber")  # float targets shaped like the output
TARGET_NAMES = ("labels", "label", "targets", "target", "y")  # the target among several inputs
FILLS = ("random", "ones")  # how a synthesised input is filled (masks: ones)
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")

# --------------------------------------------------------------------------------------------------
# The loaded program: a trainable copy, and what it takes


def _fresh_module(program: torch.export.ExportedProgram) -> nn.Module:
    """A trainable GraphModule with its own copy of the weights (`program.module()` shares them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deepcopy of pytree specs: a torch-internal notice
        return copy.deepcopy(program.module())


def describe_program(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """The program's user inputs (per-sample shape, None where dynamic; dtype) and batch range."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    batch: dict[str, Any] = {"dynamic": True, "min": None, "max": None}
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise ArchiveError(
                "unsupported_inputs", f"input {name!r} of the exported program is not a batched tensor"
            )
        dims = [d if isinstance(d, int) else None for d in value.shape]
        inputs.append({"name": name, "shape": dims[1:], "dtype": str(value.dtype).removeprefix("torch.")})
        first = value.shape[0]
        if isinstance(first, int):
            batch = {"dynamic": False, "size": first}
        elif batch["dynamic"]:
            bounds = program.range_constraints.get(first.node.expr)
            if bounds is not None:
                lower, upper = bounds.lower, bounds.upper
                batch["min"] = int(lower) if _finite(lower) else None
                batch["max"] = int(upper) if _finite(upper) else None
    return {"inputs": inputs, "batch": batch}


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# The training task: what the probe feeds the program and how it computes the loss


@dataclass(frozen=True)
class ExportedConfig:
    """How to train an exported program (stored as the recommendation's `model.config`)."""

    loss: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    input_high: int | None = None  # exclusive bound of integer inputs (token ids)
    target_shape: tuple[int, ...] = ()
    target_dtype: str = "int64"
    target_high: int | None = None  # classes of integer targets
    max_batch_size: int | None = None  # upper bound of the exported batch dimension, when it has one
    # Programs with several inputs: [{"name", "shape", "dtype", "high", "fill"}] in the forward's order
    # (the first is also input_shape/input_dtype/input_high); None: one input, called positionally.
    inputs: tuple[dict[str, Any], ...] | None = None
    target_name: str | None = None  # model_returns_loss with several inputs: the target's argument name
    device: str = "cpu"  # where the probe trains it (set by the probe, not part of the artifact)
    ignore_index: int = -100  # cross_entropy targets left out (the request's, set by the probe)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "target_shape", tuple(self.target_shape))
        if self.inputs is not None:
            object.__setattr__(self, "inputs", tuple(_input_spec(spec) for spec in self.inputs))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        for name in ("input_dtype", "target_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
        if any(not isinstance(d, int) or d <= 0 for d in self.input_shape + self.target_shape):
            raise ValueError("shapes must be lists of positive integers")
        if _is_integer(self.input_dtype) and self.input_dtype != "bool" and not self.input_high:
            raise ValueError("integer inputs need input_high (the exclusive bound of their values)")
        if _is_integer(self.target_dtype) and self.target_dtype != "bool" and not self.target_high:
            raise ValueError("integer targets need target_high (the number of classes)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("device")
        data.pop("ignore_index")
        for key in ("inputs", "target_name"):  # one-input configs stay as they were
            if data[key] is None:
                data.pop(key)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs or ()]

    @property
    def num_classes(self) -> int:
        return int(self.target_high or 0) if _is_integer(self.target_dtype) else 0


def _is_integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _input_spec(spec: Any) -> dict[str, Any]:
    """One entry of ExportedConfig.inputs, checked (ValueError names the input and the problem)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError("inputs must be objects with a name, shape and dtype")
    name, dtype, fill = spec["name"], spec.get("dtype"), spec.get("fill", "random")
    unknown = sorted(set(spec) - {"name", "shape", "dtype", "high", "fill"})
    if unknown:
        raise ValueError(f"input {name!r}: unknown fields {unknown}")
    shape = spec.get("shape")
    if not isinstance(shape, list | tuple) or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"input {name!r}: shape must be a list of positive integers")
    if dtype not in DTYPES:
        raise ValueError(f"input {name!r}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if fill not in FILLS:
        raise ValueError(f"input {name!r}: fill must be one of {list(FILLS)}, got {fill!r}")
    high = spec.get("high")
    if _is_integer(dtype) and dtype != "bool" and fill == "random" and not high:
        raise ValueError(f"integer input {name!r} needs high (the exclusive bound of its values)")
    return {"name": name, "shape": list(shape), "dtype": dtype, "high": high, "fill": fill}


def _synthesise(
    shape: tuple[int, ...],
    dtype: str,
    high: int | None,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    full = (batch_size, *shape)
    if dtype == "bool":
        return randint(2, full, device, generator).bool()
    if _is_integer(dtype):
        return randint(int(high or 1), full, device, generator).to(getattr(torch, dtype))
    return randn(full, device, generator).to(getattr(torch, dtype))


def synthesise_inputs(
    config: ExportedConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None
) -> torch.Tensor | NamedInputs:
    """A batch of inputs for `config`: one tensor, or every named input (ones for masks, see above)."""
    if config.inputs is None:
        return _synthesise(
            config.input_shape, config.input_dtype, config.input_high, batch_size, device, generator
        )
    tensors = {}
    for spec in config.inputs:
        if spec["fill"] == "ones":
            dtype = getattr(torch, spec["dtype"])
            tensors[spec["name"]] = torch.ones((batch_size, *spec["shape"]), dtype=dtype, device=device)
        else:
            shape = tuple(spec["shape"])
            tensors[spec["name"]] = _synthesise(
                shape, spec["dtype"], spec["high"], batch_size, device, generator
            )
    return NamedInputs(tensors)


def _call(program: nn.Module, inputs: Any, extra: dict[str, Any] | None = None) -> Any:
    """Named inputs go in as keyword arguments (the program's own argument names), one tensor positionally."""
    if isinstance(inputs, NamedInputs):
        return program(**dict(inputs), **(extra or {}))
    if extra:
        return program(inputs, *extra.values())
    return program(inputs)


class _DeferredLoss:
    """What `forward(x)` returns for a model that computes its own loss from `(x, target)`."""

    def __init__(
        self, program: nn.Module, inputs: torch.Tensor | NamedInputs, target_name: str | None
    ) -> None:
        self.program = program
        self.inputs = inputs
        self.target_name = target_name

    def __call__(self, targets: torch.Tensor) -> Any:
        return _call(self.program, self.inputs, {self.target_name or "target": targets})


class ExportedModule(nn.Module):
    """The program's GraphModule behind the zoo's `model(inputs)` convention.

    `train()`/`eval()` only set the flag: the graph was captured in train mode and GraphModule refuses
    them. With `model_returns_loss`, `forward(x)` defers the call until the loss sees the targets.
    Several inputs arrive as one `NamedInputs` and are passed by name.
    """

    def __init__(self, program: nn.Module, returns_loss: bool, target_name: str | None = None) -> None:
        super().__init__()
        self.program = program
        self.returns_loss = returns_loss
        self.target_name = target_name

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor | NamedInputs) -> Any:
        if self.returns_loss:
            return _DeferredLoss(self.program, inputs, self.target_name)
        return _call(self.program, inputs)


def _scalar(value: Any) -> torch.Tensor:
    if isinstance(value, dict):
        value = value.get("loss", next(iter(value.values()), None))
    elif isinstance(value, list | tuple):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}")
    return value.reshape(())


def _loss_cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss cross_entropy needs the model to return logits, got {type(outputs).__name__}")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _loss_mse(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss mse needs the model to return a tensor, got {type(outputs).__name__}")
    return F.mse_loss(outputs.float(), targets.float())


def _loss_l1(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss l1 needs the model to return a tensor, got {type(outputs).__name__}")
    return F.l1_loss(outputs.float(), targets.float())


def _loss_huber(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss huber needs the model to return a tensor, got {type(outputs).__name__}")
    return F.huber_loss(outputs.float(), targets.float())  # delta 1.0


def _loss_returned(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return _scalar(outputs(targets) if isinstance(outputs, _DeferredLoss) else outputs)


_LOSS_FUNCTIONS = {
    "cross_entropy": _loss_cross_entropy,
    "mse": _loss_mse,
    "l1": _loss_l1,
    "huber": _loss_huber,
    "model_returns_loss": _loss_returned,
}


def model_spec_for(path: str, config: ExportedConfig, *, label: str | None = None) -> ModelSpec:
    """A ModelSpec whose `build` returns a fresh copy of the archive's program (its own weights)."""

    def build(cfg: ExportedConfig, gradient_checkpointing: bool) -> nn.Module:
        if gradient_checkpointing:
            raise ValueError("uploaded models do not support gradient checkpointing")
        program = load_program(str(path))
        if cfg.device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, cfg.device)
        return ExportedModule(_fresh_module(program), cfg.loss == "model_returns_loss", cfg.target_name)

    def make_batch(
        cfg: ExportedConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None
    ) -> tuple[torch.Tensor | NamedInputs, torch.Tensor]:
        inputs = synthesise_inputs(cfg, batch_size, device, generator)
        targets = _synthesise(
            cfg.target_shape, cfg.target_dtype, cfg.target_high, batch_size, device, generator
        )
        return inputs, targets

    return ModelSpec(
        name=label or f"uploaded model {Path(path).name}",
        description="A torch.export program uploaded by a client.",
        config_type=ExportedConfig,
        build=build,
        make_batch=make_batch,  # type: ignore[arg-type]  # inputs may be NamedInputs: they batch like a tensor
        loss=_LOSS_FUNCTIONS[config.loss],
        input_shape=lambda cfg: list(cfg.input_shape),
        input_dtype=config.input_dtype,
        num_classes=lambda cfg: cfg.num_classes,
        supports_gradient_checkpointing=False,
    )


def resolve_exported(spec: ProbeSpec) -> tuple[ModelSpec, ExportedConfig]:
    """The probe engine's `_resolve_model` for a spec with `model_artifact_path`."""
    path = str(spec.model_artifact_path)
    try:
        config = ExportedConfig.from_dict(
            {**spec.model_config, "device": spec.device, "ignore_index": spec.ignore_index}
        )
    except (TypeError, ValueError) as exc:
        raise ProbeError("invalid_config", f"invalid config for the uploaded model: {exc}") from exc
    try:
        load_program(path)
    except ArchiveError as exc:
        raise ProbeError("invalid_artifact", exc.message) from exc
    except Exception as exc:
        raise ProbeError(
            "model_error", f"loading the uploaded model failed: {type(exc).__name__}: {exc}"
        ) from exc
    return model_spec_for(path, config, label=spec.model_name), config


# --------------------------------------------------------------------------------------------------
# Config inference: the client's declaration checked against the program and completed from its output


def _declared_tensor(declared: dict[str, Any], key: str) -> dict[str, Any]:
    value = declared.get(key) or {}
    if not isinstance(value, dict):
        raise ArchiveError("invalid_model_spec", f"{key} must be an object with shape, dtype and high")
    return value


def _resolve_tensor(
    name: str, program_input: dict[str, Any], declared: dict[str, Any]
) -> tuple[tuple[int, ...], str, int | None]:
    """Per-sample shape and dtype from the program, checked against (or completed by) the declaration."""
    dims: list[int | None] = program_input["shape"]
    dtype = program_input["dtype"]
    shape = declared.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise ArchiveError("invalid_model_spec", f"{name}.shape must be a list of positive integers")
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape, strict=True)):
            shown = ["dynamic" if d is None else d for d in dims]
            raise ArchiveError(
                "input_shape_mismatch",
                f"{name}.shape {shape} does not match the exported program, whose per-sample {name} is "
                f"{shown}",
            )
    elif any(d is None for d in dims):
        raise ArchiveError(
            "invalid_model_spec",
            f"{name}.shape is required: the exported program's per-sample {name} has dynamic dimensions "
            f"{['dynamic' if d is None else d for d in dims]}",
        )
    else:
        shape = dims
    if declared.get("dtype") not in (None, dtype):
        raise ArchiveError(
            "invalid_model_spec",
            f"{name}.dtype {declared['dtype']!r} does not match the exported program's {dtype!r}",
        )
    if dtype not in DTYPES:
        raise ArchiveError("invalid_model_spec", f"{name} dtype {dtype!r} is not supported")
    high = declared.get("high")
    if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high <= 0):
        raise ArchiveError("invalid_model_spec", f"{name}.high must be a positive integer")
    return tuple(shape), dtype, high


def infer_config(program: torch.export.ExportedProgram, declared: dict[str, Any]) -> ExportedConfig:
    """The ExportedConfig for this program and the client's declaration (loss, input, target, num_classes)."""
    loss = declared.get("loss")
    if loss not in LOSSES:
        raise ArchiveError("invalid_model_spec", f"loss must be one of {list(LOSSES)}, got {loss!r}")
    num_classes = declared.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
        raise ArchiveError("invalid_model_spec", "num_classes must be a positive integer")
    described = describe_program(program)
    batch = described["batch"]
    _check_batch(batch)
    expected = 2 if loss == "model_returns_loss" else 1
    inputs = described["inputs"]
    if len(inputs) > expected:
        return _infer_several(program, declared, described, loss, num_classes)
    if len(inputs) < expected:
        signature = "forward(x, target)" if expected == 2 else "forward(x)"
        raise ArchiveError(
            "unsupported_inputs",
            f"loss {loss} expects {signature}, but the exported program takes {len(inputs)} inputs "
            f"({', '.join(i['name'] for i in inputs)})",
        )
    shape, dtype, high = _resolve_tensor("input", inputs[0], _declared_tensor(declared, "input"))
    if _is_integer(dtype) and dtype != "bool" and high is None:
        high = num_classes
        if high is None and loss != "cross_entropy":
            raise ArchiveError(
                "invalid_model_spec",
                "input.high is required for integer inputs: the exclusive bound of their values "
                "(e.g. the vocabulary size)",
            )
    base = {"loss": loss, "input_shape": shape, "input_dtype": dtype, "max_batch_size": batch["max"]}
    if loss == "model_returns_loss":
        t_shape, t_dtype, t_high = _resolve_tensor("target", inputs[1], _declared_tensor(declared, "target"))
        t_high = t_high or num_classes
        if _is_integer(t_dtype) and t_dtype != "bool" and t_high is None:
            raise ArchiveError(
                "invalid_model_spec", "target.high (or num_classes) is required for integer targets"
            )
        return _config(
            {
                **base,
                "input_high": high,
                "target_shape": t_shape,
                "target_dtype": t_dtype,
                "target_high": t_high,
            }
        )
    # Run the model once to see its output: the targets are shaped after it.
    probe_input = high or num_classes or 2
    module = ExportedModule(_fresh_module(program), False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = _synthesise(shape, dtype, probe_input, 2, "cpu", generator)
        try:
            out = module(x)
        except Exception as exc:
            raise step_failed(2, exc) from exc
    target = _target_of(out, loss, num_classes, "x")
    if "target_high" in target and _is_integer(dtype) and dtype != "bool" and high is None:
        high = target["target_high"]  # token ids of a language model: its vocabulary
    return _config({**base, "input_high": high, **target})


def _target_of(out: Any, loss: str, num_classes: int | None, inputs: str) -> dict[str, Any]:
    """The target fields (`target_shape`, `target_dtype`, `target_high`) the declared loss needs for the
    model's output at batch size 2: float targets shaped like the output for a regression loss, class
    ids over its last dimension for cross_entropy."""
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchiveError(
            "unsupported_outputs",
            f"loss {loss} needs forward({inputs}) to return one tensor with the batch first, got {got} at "
            "batch size 2 (a model that computes its own loss: loss=model_returns_loss)",
        )
    per_sample = tuple(int(d) for d in out.shape[1:])
    if loss in REGRESSION_LOSSES:
        return {"target_shape": per_sample, "target_dtype": "float32"}
    if not per_sample or not out.is_floating_point():
        raise ArchiveError(
            "unsupported_outputs",
            f"loss cross_entropy needs float logits [batch, ..., classes], got {list(out.shape)} {out.dtype}",
        )
    classes = per_sample[-1]
    if num_classes is not None and num_classes != classes:
        raise ArchiveError(
            "invalid_model_spec",
            f"num_classes is {num_classes} but the model's logits have {classes} classes (last dimension)",
        )
    return {"target_shape": per_sample[:-1], "target_dtype": "int64", "target_high": classes}


def _embedding_bounds(program: torch.export.ExportedProgram) -> dict[str, int]:
    """{user input name: rows of the embedding it indexes}, for inputs that reach `aten.embedding` through
    at most a few shape-only ops (view, reshape, expand, slice...): the exclusive bound of their ids."""
    users = set(program.graph_signature.user_inputs)
    bounds: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or "embedding" not in str(node.target) or len(node.args) < 2:
            continue
        weight, index = node.args[0], node.args[1]
        value = getattr(weight, "meta", {}).get("val")
        for _ in range(6):  # follow the index back through shape-only ops to a placeholder
            if not isinstance(index, torch.fx.Node) or index.op == "placeholder" or not index.args:
                break
            index = index.args[0]
        if isinstance(index, torch.fx.Node) and index.name in users and isinstance(value, torch.Tensor):
            rows = value.shape[0]
            if isinstance(rows, int):
                bounds[index.name] = min(rows, bounds.get(index.name, rows))
    return bounds


def _infer_several(
    program: torch.export.ExportedProgram,
    declared: dict[str, Any],
    described: dict[str, Any],
    loss: str,
    num_classes: int | None,
) -> ExportedConfig:
    """infer_config for a program with several inputs (e.g. input_ids + attention_mask [+ labels]).

    Each input keeps its argument name, exported per-sample shape (static: the probe varies only the
    batch) and dtype; integer inputs that index an embedding get its rows as `high`, inputs named
    `*mask*` are synthesised as ones, other integer inputs take the declared `input.high` or
    `num_classes`. With model_returns_loss the target is the input named in TARGET_NAMES, else the last.
    """
    program_inputs = list(described["inputs"])
    target_input = None
    if loss == "model_returns_loss":
        named = [i for i in program_inputs if i["name"] in TARGET_NAMES]
        target_input = named[0] if named else program_inputs[-1]
        program_inputs = [i for i in program_inputs if i is not target_input]
    bounds = _embedding_bounds(program)
    declared_input = _declared_tensor(declared, "input")
    specs = []
    for item in program_inputs:
        name, dtype = item["name"], item["dtype"]
        if any(d is None for d in item["shape"]):
            raise ArchiveError(
                "unsupported_inputs",
                f"input {name!r} has dynamic dimensions besides the batch "
                f"({['dynamic' if d is None else d for d in item['shape']]}): export it with a fixed "
                "sequence length (only the batch dimension dynamic)",
            )
        if dtype not in DTYPES:
            raise ArchiveError("invalid_model_spec", f"input {name!r} has dtype {dtype!r}, not supported")
        fill, high = "random", None
        if "mask" in name.lower():
            fill = "ones"
        elif _is_integer(dtype) and dtype != "bool":
            high = bounds.get(name) or declared_input.get("high") or num_classes
            if not high:
                raise ArchiveError(
                    "invalid_model_spec",
                    f"integer input {name!r} indexes no embedding, so the bound of its values is unknown: "
                    "declare input.high (the exclusive bound, e.g. the vocabulary size)",
                )
        specs.append({"name": name, "shape": item["shape"], "dtype": dtype, "high": high, "fill": fill})
    first = specs[0]
    base: dict[str, Any] = {
        "loss": loss,
        "input_shape": first["shape"],
        "input_dtype": first["dtype"],
        "input_high": first["high"] if first["fill"] == "random" else (first["high"] or 2),
        "max_batch_size": described["batch"]["max"],
        "inputs": specs,
    }
    if target_input is not None:
        t_shape, t_dtype, t_high = _resolve_tensor(
            "target", target_input, _declared_tensor(declared, "target")
        )
        t_high = t_high or num_classes
        if _is_integer(t_dtype) and t_dtype != "bool" and t_high is None:
            raise ArchiveError(
                "invalid_model_spec",
                f"target.high (or num_classes) is required for the integer target {target_input['name']!r}",
            )
        return _config(
            {
                **base,
                "target_shape": t_shape,
                "target_dtype": t_dtype,
                "target_high": t_high,
                "target_name": target_input["name"],
            }
        )
    probe_config = _config({**base, "target_shape": (), "target_dtype": "float32"})
    module = ExportedModule(_fresh_module(program), False)
    with torch.no_grad():
        x = synthesise_inputs(probe_config, 2, "cpu", torch.Generator().manual_seed(0))
        try:
            out = module(x)
        except Exception as exc:
            raise step_failed(2, exc) from exc
    names = ", ".join(s["name"] for s in specs)
    return _config({**base, **_target_of(out, loss, num_classes, names)})


def _check_batch(batch: dict[str, Any]) -> None:
    """ArchiveError unless the batch dimension is dynamic and may reach 3 (the dry run's sizes)."""
    if not batch["dynamic"]:
        raise _static(batch["size"])
    if batch["max"] is not None and batch["max"] < 3:
        raise ArchiveError(
            "static_batch_dimension",
            f"the batch dimension is limited to at most {batch['max']}; export it with "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}} and no small max",
        )


def _config(values: dict[str, Any]) -> ExportedConfig:
    try:
        return ExportedConfig(**values)
    except ValueError as exc:
        raise ArchiveError("invalid_model_spec", str(exc)) from exc


def _static(size: int) -> ArchiveError:
    return ArchiveError(
        "static_batch_dimension",
        f"the batch dimension is static: the program was exported for batch size {size} only. Export "
        "with dynamic_shapes={'x': {0: torch.export.Dim('batch')}} so the probe can vary it",
    )


def step_failed(batch_size: int, exc: BaseException) -> ArchiveError:
    """`dry_run_failed` for a training step that raised (the exception's text, capped)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 800:
        text = text[:800] + " ..."
    return ArchiveError("dry_run_failed", f"a training step at batch size {batch_size} failed: {text}")
