"""One real training step of a zoo model: forward, loss, backward, `optimizer.step()`, `zero_grad()`.

Memory convention measured (`loop`): "pytorch" runs `zero_grad(set_to_none=True)` right after
`optimizer.step()`, so the gradients are freed before the next forward. "lightning" runs Lightning's
automatic optimisation: the previous step's gradients live through the forward and are set to None
after it, before backward (`Closure`: training_step, zero_grad, backward). `prefetch_batches` more
batches are held on the host through each step (Lightning's fetcher holds one when the DataLoader has
no length); on CUDA they are not device memory. `run(..., micro_steps=2)` measures gradient
accumulation in the loop's convention: the second micro-step's forward and backward run with the first
one's gradients alive (ACCUMULATING_CONVENTION).

The optimizer's state (momentum, Adam moments) only exists after its first step; a probe that
measures the first step over-reports the limit (an MLP "fitted" at 2193 and failed at the second step;
the true limit was 1811), so `warm_up()` runs that first step before anything is measured.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from models.base import ModelSpec
from service.probing.memory import FORWARD_BACKWARD, OPTIMIZER_STEP
from service.probing.spec import SGD_DEFAULT_MOMENTUM, ProbeError, ProbeSpec

MEASURED_CONVENTION = (
    "zero_grad(set_to_none=True) after optimizer.step(): gradients are freed before the next forward; "
    "optimizer state exists (measured from the second step). Loops that zero gradients after the "
    "forward (Lightning) keep the gradients alive through it: measured with training.loop lightning"
)
LIGHTNING_CONVENTION = (
    "Lightning's automatic optimisation: the previous step's gradients stay alive through the forward and "
    "are set to None before backward; optimizer state exists (measured from the second step)"
)
ACCUMULATING_CONVENTION = (
    "gradient accumulation: two micro-steps in the loop's convention, the second one's forward and "
    "backward with the first one's gradients alive (backward adds into them), then the optimizer step"
)
MEASURED_CONVENTIONS = {"pytorch": MEASURED_CONVENTION, "lightning": LIGHTNING_CONVENTION}

OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}  # fp32 copies of the trainable parameters
SGD_MOMENTUM = SGD_DEFAULT_MOMENTUM  # when the client does not say
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _NoPhases:
    """Recorder stand-in when nothing is measured."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NO_PHASES = _NoPhases()


def build_optimizer(
    name: str,
    parameters: Iterator[nn.Parameter] | list[nn.Parameter],
    learning_rate: float,
    *,
    momentum: float = SGD_MOMENTUM,
    nesterov: bool = False,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The client's optimizer: SGD (momentum, nesterov, weight decay), Adam or AdamW (betas, eps,
    weight decay). Options that do not apply to `name` are ignored."""
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ProbeError("invalid_spec", "nesterov needs a momentum > 0")
        return torch.optim.SGD(
            parameters, lr=learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name in ("adam", "adamw"):
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ProbeError("invalid_spec", f"betas must be two numbers in [0, 1), got {list(betas)}")
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        beta1, beta2 = float(betas[0]), float(betas[1])
        return cls(parameters, lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    raise ProbeError("invalid_spec", f"unknown optimizer {name!r}; expected sgd, adam or adamw")


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise ProbeError("unsupported_precision") when autocast cannot run `precision` on `device`."""
    if precision == "fp32":
        return
    if precision not in AUTOCAST_DTYPES:
        raise ProbeError(
            "unsupported_precision", f"unknown precision {precision!r}; expected fp32, bf16 or fp16"
        )
    dtype = AUTOCAST_DTYPES[precision]
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ProbeError(
            "unsupported_precision", f"bf16 is not supported on {torch.cuda.get_device_name(device)}"
        )
    # torch.autocast warns and disables itself for a dtype the device does not support.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type=device.type, dtype=dtype):
                pass
            if precision == "fp16":
                torch.amp.GradScaler(device.type)
        except (RuntimeError, ValueError) as exc:
            raise ProbeError(
                "unsupported_precision", f"{precision} autocast on {device.type}: {exc}"
            ) from exc
    problems = [
        str(w.message)
        for w in caught
        if "autocast" in str(w.message).lower() or "scaler" in str(w.message).lower()
    ]
    if problems:
        raise ProbeError("unsupported_precision", f"{precision} autocast on {device.type}: {problems[0]}")


def is_precision_error(exc: BaseException) -> bool:
    """An op the model uses has no kernel for the reduced precision (e.g. "not implemented for 'Half'")."""
    text = str(exc)
    return isinstance(exc, RuntimeError | NotImplementedError) and (
        "not implemented for 'Half'" in text or "not implemented for 'BFloat16'" in text
    )


class TrainingStep:
    """A model, its optimizer and the precision machinery, ready to run real steps at any batch size."""

    def __init__(
        self,
        model_spec: ModelSpec,
        config: Any,
        *,
        optimizer: str = "sgd",
        learning_rate: float = 0.1,
        precision: str = "fp32",
        gradient_checkpointing: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        optimizer_options: dict[str, Any] | None = None,
        loop: str = "pytorch",
        prefetch_batches: int = 0,
    ) -> None:
        if loop not in MEASURED_CONVENTIONS:
            raise ProbeError("invalid_spec", f"unknown training loop {loop!r}; expected pytorch or lightning")
        if prefetch_batches < 0:
            raise ProbeError("invalid_spec", f"prefetch_batches must be >= 0, got {prefetch_batches}")
        self.loop = loop
        self.prefetch_batches = prefetch_batches
        self.model_spec = model_spec
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        check_precision_supported(precision, self.device)
        if gradient_checkpointing and not model_spec.supports_gradient_checkpointing:
            raise ProbeError(
                "unsupported_option", f"model {model_spec.name!r} does not support gradient checkpointing"
            )
        torch.manual_seed(seed)
        try:
            model = model_spec.build(config, gradient_checkpointing)
        except Exception as exc:
            raise ProbeError(
                "model_error", f"building {model_spec.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        # Sized on the host first, so a model that cannot fit is refused before it is moved.
        self.state_bytes_estimate = _state_bytes(model, optimizer)
        self.model = model.to(self.device).train()
        self.optimizer = build_optimizer(
            optimizer, self.model.parameters(), learning_rate, **(optimizer_options or {})
        )
        self.optimizer_name = optimizer
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        # Batches come from a CPU generator so one seed gives the same data on every device.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.steps_done = 0

    @classmethod
    def from_spec(cls, spec: ProbeSpec, model_spec: ModelSpec, config: Any) -> TrainingStep:
        return cls(
            model_spec,
            config,
            optimizer=spec.optimizer,
            learning_rate=spec.learning_rate,
            precision=spec.precision,
            gradient_checkpointing=spec.gradient_checkpointing,
            device=spec.device,
            seed=spec.seed,
            optimizer_options=spec.optimizer_options(),
            loop=spec.loop,
            prefetch_batches=spec.prefetch_batches,
        )

    # -- running steps

    def make_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model_spec.make_batch(self.config, batch_size, self.device, self.generator)

    def run(self, batch_size: int, recorder: Any = NO_PHASES, micro_steps: int = 1) -> torch.Tensor:
        """Make a batch and train on it (the batch is part of the forward/backward phase's memory).

        `micro_steps` > 1 accumulates: each later micro-step runs its forward and backward with the
        gradients of the earlier ones alive and adds into them (ACCUMULATING_CONVENTION), then one
        optimizer step."""
        with recorder.phase(FORWARD_BACKWARD):
            held: list[Any] = []  # the micro-batch and what the fetcher holds ahead of it
            for index in range(micro_steps):
                held.clear()  # the loop moves on: the previous micro-batch is freed
                inputs, targets = self.make_batch(batch_size)
                # Batches a data fetcher holds ahead (on the host) while this one trains.
                held += [inputs, targets, [self._prefetch(batch_size) for _ in range(self.prefetch_batches)]]
                del inputs, targets
                loss = self._forward_backward(held[0], held[1], accumulate=index > 0)
        with recorder.phase(OPTIMIZER_STEP):
            self._optimizer_step()
        del held
        return loss

    def train_on(
        self, inputs: torch.Tensor, targets: torch.Tensor, recorder: Any = NO_PHASES
    ) -> torch.Tensor:
        """One step on a given batch (throughput timing reuses one batch). Returns the detached loss."""
        with recorder.phase(FORWARD_BACKWARD):
            loss = self._forward_backward(inputs, targets)
        with recorder.phase(OPTIMIZER_STEP):
            self._optimizer_step()
        return loss

    def warm_up(self, batch_size: int = 1) -> float:
        """The first step, which creates the optimizer state; checks that its loss is finite."""
        loss = float(self.run(batch_size))
        self.check_finite_loss(loss, batch_size)
        return loss

    def check_finite_loss(self, loss: float, batch_size: int) -> None:
        """Raise ProbeError("nan_loss") when the freshly initialised model's loss is not finite: a model
        or data problem, not a batch size one."""
        if not math.isfinite(loss):
            raise ProbeError(
                "nan_loss",
                f"loss is {loss} at the first training step of {self.model_spec.name!r} "
                f"(batch size {batch_size})",
            )

    def discard_gradients(self) -> None:
        """Drop gradients a failed step left behind."""
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Wait for queued device work, so a clock read after it measures the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, accumulate: bool = False
    ) -> torch.Tensor:
        """`accumulate`: a later micro-step, which keeps the gradients alive and adds into them."""
        if self.loop == "lightning" and not accumulate:
            self._keep_gradients()
        with self._autocast():
            outputs = self.model(inputs)
            loss = self.model_spec.loss(outputs, targets)
        del outputs  # only the graph needs it, and backward frees that
        if self.loop == "lightning" and not accumulate:  # Lightning's closure: step, zero_grad, backward
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.loop == "pytorch":
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def _keep_gradients(self) -> None:
        """Lightning's steady state: the previous step's gradients are alive when the forward starts.
        After the first step (or a failed one, whose gradients were dropped) there are none: allocate
        them, as real tensors the memory measurement counts."""
        for parameter in self.model.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)

    def _prefetch(self, batch_size: int) -> Any:
        """The next batch, made on the host as a DataLoader makes it (on CUDA it is not device memory)."""
        return self.model_spec.make_batch(self.config, batch_size, torch.device("cpu"), self.generator)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    # -- memory accounting

    def memory_roots(self) -> list[Any]:
        """What is alive between steps and must be counted by a CPU tracker."""
        roots: list[Any] = [self.model, self.optimizer]
        if self.scaler is not None:
            roots.append(self.scaler)
        return roots

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients (one per trainable parameter) and optimizer state, measured
        once the state exists (after `warm_up`), else estimated from the optimizer type."""
        measured = _tensor_bytes(t for state in self.optimizer.state.values() for t in state.values())
        estimate = self.state_bytes_estimate
        return {**estimate, "optimizer_state": measured or estimate["optimizer_state"]}


def _tensor_bytes(tensors: Any) -> int:
    """Sum of storage bytes, each storage once (tied weights share one)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def _state_bytes(model: nn.Module, optimizer: str) -> dict[str, int]:
    """Parameters + buffers, gradients and expected optimizer state of `model`, in bytes."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = _tensor_bytes(trainable)
    return {
        "parameters": _tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "gradients": trainable_bytes,
        "optimizer_state": trainable_bytes * OPTIMIZER_STATE_COPIES.get(optimizer, 2),
    }
