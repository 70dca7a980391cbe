"""`recommend(model, example_inputs, ...)`: one line from a training script to a typed recipe.

Exports the user's `nn.Module` (batchsize_client.export), packs a data sample, uploads both, waits and
returns the `Recipe`; with `local=True` it runs the probe in this process instead (needs the
batchsize-service package, which carries the probe engine).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchsize_client.client import BatchsizeClient, ProgressCallback, build_request
from batchsize_client.errors import BatchsizeError
from batchsize_client.export import DEFAULT_SAMPLE_EXAMPLES, dataset_size, export_model, pack_sample
from batchsize_client.recipe import Recipe

TRAINING_KEYS = (
    "optimizer",
    "learning_rate",
    "reference_batch_size",
    "precision",
    "gradient_checkpointing",
    "device",
    "memory_budget_bytes",
    "objective",
    "time_budget_s",
    "force",
)


def recommend(
    model: Any,
    example_inputs: Any,
    *,
    dataset: Any = None,
    loss: str = "cross_entropy",
    dataset_size_hint: int | None = None,
    local: bool = False,
    url: str | None = None,
    api_key: str | None = None,
    client: BatchsizeClient | None = None,
    input_high: int | None = None,
    sample_examples: int = DEFAULT_SAMPLE_EXAMPLES,
    wait_timeout_s: float = 900,
    on_progress: ProgressCallback | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    **training: Any,
) -> Recipe:
    """Recommend a batch size, accumulation, learning rate and warm-up for your own model.

    `example_inputs`: one batch of inputs, as a tensor, a tuple (positional) or a dict (keyword: the
    forward's argument names, e.g. `{"input_ids": ..., "attention_mask": ...}`); their shared first
    dimension is the batch and is exported as dynamic (every other dimension, such as the sequence
    length, stays as in the example). `loss`: `cross_entropy` (the model returns logits), `mse`, or
    `model_returns_loss` (forward(inputs..., target) returns the loss, e.g. a Hugging Face model given
    `labels` in example_inputs). `dataset`: a DataLoader, a Dataset of (x, y), (inputs..., target) or
    dict items (Hugging Face style `{"input_ids", "attention_mask", "labels"}`), or an (inputs, target)
    pair; a sample of it measures the noise scale and its length is the dataset size (else
    `dataset_size_hint`, else 50 000). `training`: optimizer, learning_rate,
    reference_batch_size, precision, memory_budget_bytes, objective, time_budget_s, device, force, and
    any further training field the service takes (momentum, weight_decay, epochs...).

    Against a service at `url` (default BATCHSIZE_URL) or through `client`; `local=True` probes here.
    """
    size = dataset_size_hint or (dataset_size(dataset) if dataset is not None else None) or 50_000
    with tempfile.TemporaryDirectory(prefix="batchsize-") as folder:
        exported = export_model(
            model, example_inputs, Path(folder) / "model.pt2", loss=loss, input_high=input_high
        )
        sample = None
        if dataset is not None:
            sample = pack_sample(
                dataset,
                exported.model_inputs,
                Path(folder) / "sample.npz",
                max_examples=sample_examples,
                target_name=exported.target_name if len(exported.model_inputs) > 1 else None,
            )
        declared = {"loss": loss, **exported.declared}
        if local:
            return _recommend_local(exported.path, declared, sample, size, training, on_event)
        if client is not None:
            return _recommend_remote(
                client, exported.path, declared, sample, size, training, wait_timeout_s, on_progress
            )
        with BatchsizeClient(url, api_key=api_key, timeout=60) as own:
            return _recommend_remote(
                own, exported.path, declared, sample, size, training, wait_timeout_s, on_progress
            )


def _split_training(training: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build_request keywords, further `training` fields)."""
    known = {k: v for k, v in training.items() if k in TRAINING_KEYS}
    extra = {k: v for k, v in training.items() if k not in TRAINING_KEYS}
    return known, extra


def _recommend_remote(
    client: BatchsizeClient,
    model_path: Path,
    declared: dict[str, Any],
    sample: Path | None,
    size: int,
    training: dict[str, Any],
    wait_timeout_s: float,
    on_progress: ProgressCallback | None,
) -> Recipe:
    artifact = client.upload_model(
        model_path, loss=declared["loss"], input=declared.get("input"), target=declared.get("target")
    )
    sample_id = client.upload_sample(sample)["id"] if sample is not None else None
    known, extra = _split_training(training)
    body = build_request(
        artifact_id=artifact["id"], dataset_size=size, sample_id=sample_id, training=extra, **known
    )
    job = client.submit(body)
    done = client.wait(job.id, timeout_s=wait_timeout_s, on_progress=on_progress)
    return Recipe.from_job(done)


def _recommend_local(
    model_path: Path,
    declared: dict[str, Any],
    sample: Path | None,
    size: int,
    training: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None] | None,
) -> Recipe:
    try:
        from service.local import local_probe_spec, run_local
        from service.probing.spec import ProbeError, training_options
    except ImportError as exc:
        raise BatchsizeError(
            f"local=True runs the probe engine here and needs the batchsize-service package ({exc})",
            code="service_missing",
        ) from None
    known, extra = _split_training(training)
    if unknown := sorted(set(extra) - set(training_options(extra))):  # the probe reads only those it knows
        raise BatchsizeError(
            f"local=True does not take {unknown} (ask a service for those)", code="invalid_settings"
        )
    request = build_request(artifact_id="local", dataset_size=size, training=extra, **known)
    settings = {
        **request["training"],
        "dataset_size": size,
        "device": request.get("device"),
        "memory_budget_bytes": request.get("memory_budget_bytes"),
        "objective": request["objective"],
        "time_budget_s": request["time_budget_s"],
    }
    try:
        spec = local_probe_spec(None, None, model_path, declared, sample, settings)
        result = run_local(spec, on_event)
    except ProbeError as exc:
        raise BatchsizeError(exc.message, code=exc.code) from None
    return Recipe.from_result(result)
