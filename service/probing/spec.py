"""The probe's input and the events it streams back. Plain dataclasses: no pydantic here, so the probe
engine runs where only torch is installed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["fp32", "bf16", "fp16"]
Objective = Literal["time_to_target", "throughput", "max_feasible"]
Loop = Literal["pytorch", "lightning"]  # the training loop whose memory convention is measured

SGD_DEFAULT_MOMENTUM = 0.9

# Bump when the probe's method changes in a way that changes answers: it is part of the fingerprint.
PROBE_VERSION = "2"

# The search's hard cap on the batch size, whatever the dataset size or the model allows.
MAX_BATCH_SIZE = 65_536


@dataclass
class ProbeSpec:
    """One probe job, as the worker hands it to the probe subprocess (JSON-serialisable)."""

    model_name: str
    model_config: dict[str, Any] = field(default_factory=dict)
    optimizer: Optimizer = "sgd"
    learning_rate: float = 0.1
    reference_batch_size: int = 32
    # The client's optimizer settings: the probe trains exactly the optimizer the client runs.
    momentum: float = SGD_DEFAULT_MOMENTUM  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw only
    eps: float = 1e-8  # adam/adamw only
    weight_decay: float = 0.0
    # The training horizon the answer is for: epochs at reference_batch_size, or a loss on the data
    # sample's held-out part; neither: the deepest loss the probe reached (the answer says which).
    epochs: float | None = None
    target_loss: float | None = None
    ignore_index: int = -100  # cross_entropy targets with this value are left out of the loss
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    loop: Loop = "pytorch"  # step.MEASURED_CONVENTIONS: when the loop frees the gradients
    prefetch_batches: int = 0  # batches the data pipeline holds ahead on the host during a step
    device: Literal["cpu", "cuda"] = "cpu"  # the host device the probe runs on
    memory_budget_bytes: int | None = None  # None: the device's free memory (CPU: a share of it)
    time_budget_s: float = 120.0
    objective: Objective = "time_to_target"
    dataset_size: int = 50_000
    device_count: int = 1  # devices the client will train on (recipe only)
    target_device: dict[str, Any] | None = None  # the client's target device, when it differs
    sample_path: str | None = None  # a client data sample (.npz / .safetensors), checked by the service
    # An uploaded torch.export archive (.pt2): model_name is then only a label and model_config holds
    # its training task (service.probing.exported.ExportedConfig: loss, input and target specs).
    model_artifact_path: str | None = None
    max_batch_size: int = MAX_BATCH_SIZE  # hard cap for the search (also capped by dataset_size)
    seed: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sgd_momentum(self) -> float | None:
        """SGD's momentum; None for the Adam family."""
        return self.momentum if self.optimizer == "sgd" else None

    def optimizer_options(self) -> dict[str, Any]:
        """The keyword arguments `step.build_optimizer` takes for this optimizer (only those it uses)."""
        if self.optimizer == "sgd":
            return {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}
        return {"betas": tuple(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def horizon(self) -> dict[str, Any]:
        """The training horizon as the client stated it (both None: not stated)."""
        return {"epochs": self.epochs, "target_loss": self.target_loss}


class ProbeError(Exception):
    """A probe failure with a stable code and a message meant for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def training_options(training: dict[str, Any]) -> dict[str, Any]:
    """The optimizer settings, horizon and loop of a stored `training` (older requests lack them)."""
    keys: tuple[str, ...] = ("momentum", "nesterov", "betas", "eps", "weight_decay", "epochs", "target_loss")
    keys += ("ignore_index", "loop", "prefetch_batches")
    return {k: list(training[k]) if k == "betas" else training[k] for k in keys if k in training}


def build_probe_spec(
    *,
    model_name: str,
    model_config: dict[str, Any],
    training: dict[str, Any],
    device: Literal["cpu", "cuda"],
    dataset_size: int,
    time_budget_s: float,
    objective: Objective,
    memory_budget_bytes: int | None = None,
    device_count: int = 1,
    target_device: dict[str, Any] | None = None,
    model_artifact_path: str | None = None,
    sample_path: str | None = None,
) -> ProbeSpec:
    """The ProbeSpec for a request, whether the worker runs it or a client runs it in process.

    `training`: optimizer, learning_rate, reference_batch_size, precision, gradient_checkpointing and
    any of `training_options`' keys. The search is capped at MAX_BATCH_SIZE, the dataset size and, for
    an exported model, the upper bound of its batch dimension (`model_config["max_batch_size"]`).
    """
    caps = [MAX_BATCH_SIZE, dataset_size]
    if model_config.get("max_batch_size"):
        caps.append(int(model_config["max_batch_size"]))
    return ProbeSpec(
        model_name=model_name,
        model_config=model_config,
        model_artifact_path=model_artifact_path,
        optimizer=training["optimizer"],
        learning_rate=training["learning_rate"],
        reference_batch_size=training["reference_batch_size"],
        precision=training["precision"],
        gradient_checkpointing=training["gradient_checkpointing"],
        **training_options(training),
        device=device,
        memory_budget_bytes=memory_budget_bytes,
        time_budget_s=float(time_budget_s),
        objective=objective,
        dataset_size=dataset_size,
        device_count=device_count,
        target_device=target_device,
        sample_path=sample_path,
        max_batch_size=min(caps),
    )
