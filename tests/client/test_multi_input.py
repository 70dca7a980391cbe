"""recommend(model, ...) on a Hugging Face model with several keyword inputs (input_ids +
attention_mask, labels): export under the forward's names, samples with one array per input, an
in-process probe, and one through the service with a noise scale measured on the sample."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import batchsize_client as bc
from batchsize_client.export import export_model, pack_sample
from service.probing.exported import dry_run

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, LABELS = 100, 8, 3


def _bert() -> Any:
    """A tiny BERT classifier built from a config (2 layers, hidden 32; nothing downloaded)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=LABELS,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _items(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Hugging Face style dataset items; the label is the first token's residue (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=generator)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=generator)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return [
        {"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": ids[i, 0] % LABELS}
        for i in range(n)
    ]


def _example(n: int = 4) -> dict[str, torch.Tensor]:
    items = _items(n, seed=1)
    return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def bert() -> Any:
    return _bert()


def test_keyword_and_positional_inputs_export_under_the_forwards_names(bert: Any, tmp_path: Path) -> None:
    example = _example()
    exported = export_model(bert, example, tmp_path / "kw.pt2", loss="cross_entropy")
    assert exported.input_names == ["input_ids", "attention_mask"] and exported.target_name is None
    assert exported.declared == {"input": {"high": VOCAB}}
    config = dry_run(str(exported.path), {"loss": "cross_entropy", **exported.declared})["config"]
    assert [(i["name"], i["high"], i["fill"]) for i in config["inputs"]] == [
        ("input_ids", VOCAB, "random"),
        ("attention_mask", None, "ones"),
    ]
    assert config["target_high"] == LABELS and config["target_shape"] == []

    positional = export_model(
        bert, (example["input_ids"], example["attention_mask"]), tmp_path / "pos.pt2", loss="cross_entropy"
    )
    assert positional.input_names == ["input_ids", "attention_mask"]

    with_labels = export_model(
        bert,
        {**example, "labels": torch.tensor([0, 1, 2, 0])},
        tmp_path / "own.pt2",
        loss="model_returns_loss",
    )
    assert with_labels.target_name == "labels" and with_labels.model_inputs == ["input_ids", "attention_mask"]
    assert with_labels.declared["target"] == {"high": LABELS}  # the classifier's num_labels, not the vocab
    own = dry_run(str(with_labels.path), {"loss": "model_returns_loss", **with_labels.declared})["config"]
    assert own["target_name"] == "labels" and own["target_high"] == LABELS

    with pytest.raises(bc.ExportError) as excinfo:  # labels given, but the loss is computed outside
        export_model(
            bert, {**example, "labels": torch.zeros(4, dtype=torch.long)}, tmp_path / "x.pt2", loss="mse"
        )
    assert (
        excinfo.value.code == "invalid_inputs" and "'labels' looks like the target" in excinfo.value.message
    )


@pytest.mark.parametrize("container", ["dicts", "dataloader", "tuples", "tensors"])
def test_samples_hold_one_array_per_input(container: str, tmp_path: Path) -> None:
    items = _items(50)
    stacked = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    inputs = {"input_ids": stacked["input_ids"], "attention_mask": stacked["attention_mask"]}
    data = {
        "dicts": items,
        "dataloader": torch.utils.data.DataLoader(items, batch_size=16),
        "tuples": [(i["input_ids"], i["attention_mask"], i["labels"]) for i in items],
        "tensors": (inputs, stacked["labels"]),
    }[container]
    path = pack_sample(data, ["input_ids", "attention_mask"], tmp_path / "s.npz", max_examples=40)
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["attention_mask", "input_ids", "y"]
        assert npz["input_ids"].shape == (40, SEQ) and npz["attention_mask"].shape == (40, SEQ)
        assert npz["y"].shape == (40,)
    labelled = pack_sample(items, ["input_ids", "attention_mask"], tmp_path / "l.npz", target_name="labels")
    with np.load(io.BytesIO(labelled.read_bytes()), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["attention_mask", "input_ids", "labels"]

    with pytest.raises(bc.ExportError) as excinfo:
        pack_sample(
            [{"input_ids": items[0]["input_ids"], "labels": 1}],
            ["input_ids", "attention_mask"],
            tmp_path / "m.npz",
        )
    assert excinfo.value.code == "invalid_dataset" and "'attention_mask'" in excinfo.value.message


def test_a_transformers_model_with_its_own_loss_is_probed_in_process(bert: Any) -> None:
    example = {**_example(), "labels": torch.tensor([0, 1, 2, 0])}
    recipe = bc.recommend(
        bert,
        example,
        dataset=_items(256),
        loss="model_returns_loss",
        local=True,
        optimizer="adamw",
        learning_rate=1e-3,
        memory_budget_bytes=64 * 2**20,
        time_budget_s=6,
    )
    assert isinstance(recipe, bc.Recipe) and recipe.id is None
    assert 1 <= recipe.micro_batch_size <= recipe.max_feasible_batch_size <= 256
    assert recipe.memory.budget_bytes == 64 * 2**20


def test_a_transformers_model_goes_through_the_service_with_a_measured_noise_scale(
    bert: Any, service_url: str
) -> None:
    """Upload, POST and the service's worker. The budget is an upper bound: the memory search and the
    ladder end once answered (seconds), and what is left measures the noise scale on the sample."""
    recipe = bc.recommend(
        bert,
        _example(),
        dataset=_items(1024),
        loss="cross_entropy",
        url=service_url,
        optimizer="adam",
        learning_rate=1e-3,
        reference_batch_size=8,
        memory_budget_bytes=4 * 2**20,
        time_budget_s=90,
        wait_timeout_s=600,
    )
    assert isinstance(recipe, bc.Recipe) and recipe.id is not None
    result = recipe.result
    assert result["data_sample"] is not None, result["warnings"]
    assert result["data_sample"]["measured_on"] == "client" and result["data_sample"]["size"] == 1024
    noise = result["gradient_noise_scale"]
    # Measured on the client's sample: a value, or (too few draws for an upper end) its lower bound.
    assert noise["measured_on"] == "client" and noise["status"] in ("ok", "unresolved"), noise
    assert noise["value"] is not None or noise["low"] > 0, noise
    assert 1 <= recipe.micro_batch_size <= recipe.max_feasible_batch_size
