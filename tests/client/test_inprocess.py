"""recommend(model, ...) on the user's own nn.Module: inputs by their real names, the batch dimension
found from the example, clear errors for what cannot be exported, data samples from the usual containers,
and the in-process probe (local=True)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchsize_client as bc
from batchsize_client.export import export_model, named_inputs, pack_sample
from service.probing.exported import describe_program, dry_run, load_program


class PixelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(pixel_values)).flatten(1))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.reshape(8, 64))  # the batch size written into the code


class OwnLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(tokens))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return {"loss": loss, "logits": logits}


def test_inputs_keep_the_forwards_names_positional_or_keyword() -> None:
    x = torch.randn(4, 1, 8, 8)
    assert list(named_inputs(PixelNet(), x)) == ["pixel_values"]
    assert list(named_inputs(PixelNet(), (x,))) == ["pixel_values"]
    tokens = torch.zeros(4, 6, dtype=torch.long)
    assert list(named_inputs(OwnLoss(), {"targets": tokens, "tokens": tokens})) == ["tokens", "targets"]
    with pytest.raises(bc.ExportError) as excinfo:
        named_inputs(PixelNet(), {"images": x})
    assert excinfo.value.code == "invalid_inputs" and "images" in excinfo.value.message


def test_export_makes_an_archive_the_service_accepts(tmp_path: Path) -> None:
    model = PixelNet().eval()
    exported = export_model(model, torch.randn(1, 1, 8, 8), tmp_path / "m.pt2", loss="cross_entropy")
    assert not model.training  # the caller's mode is restored
    program = load_program(str(exported.path))
    described = describe_program(program)
    assert [i["name"] for i in described["inputs"]] == ["pixel_values"] and described["batch"]["dynamic"]
    config = dry_run(str(exported.path), {"loss": "cross_entropy"})["config"]
    assert config["input_shape"] == [1, 8, 8] and config["target_high"] == 10

    tokens = torch.randint(0, 50, (4, 6))
    own = export_model(
        OwnLoss(), {"tokens": tokens, "targets": tokens}, tmp_path / "o.pt2", loss="model_returns_loss"
    )
    assert own.input_names == ["tokens", "targets"] and own.declared == {
        "input": {"high": 50},
        "target": {"high": 50},
    }
    assert (
        dry_run(str(own.path), {"loss": "model_returns_loss", **own.declared})["config"]["input_high"] == 50
    )


def test_errors_say_what_could_not_be_exported_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(bc.ExportError) as excinfo:
        export_model(FixedBatch(), torch.randn(8, 64), tmp_path / "f.pt2", loss="cross_entropy")
    assert excinfo.value.code == "static_batch_dimension" and "x.flatten(1)" in excinfo.value.message

    tokens = torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(bc.ExportError) as excinfo:  # two inputs but the loss is computed outside
        export_model(OwnLoss(), (tokens, tokens), tmp_path / "o.pt2", loss="cross_entropy")
    assert excinfo.value.code == "invalid_inputs" and "tokens, targets" in excinfo.value.message

    with pytest.raises(bc.ExportError) as excinfo:
        export_model(PixelNet(), [torch.randn(4, 1, 8, 8), "not a tensor"], tmp_path / "p.pt2", loss="mse")
    assert excinfo.value.code == "invalid_inputs"


@pytest.mark.parametrize("container", ["tensors", "dataset", "dataloader", "dicts"])
def test_samples_come_from_the_usual_containers(container: str, tmp_path: Path) -> None:
    x, y = torch.randn(100, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (100,))
    data = {
        "tensors": (x, y),
        "dataset": torch.utils.data.TensorDataset(x, y),
        "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
        "dicts": [{"pixel_values": a, "labels": b} for a, b in zip(x, y, strict=True)],
    }[container]
    path = pack_sample(data, ["pixel_values"], tmp_path / "s.npz", max_examples=40)
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
        assert npz["x"].shape == (40, 1, 8, 8) and npz["x"].dtype == np.float32
        assert npz["y"].shape == (40,)


def test_local_probe_runs_in_process_and_returns_the_typed_recipe() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))
    events: list[str] = []
    recipe = bc.recommend(
        PixelNet(),
        x[:16],
        dataset=torch.utils.data.TensorDataset(x, y),
        loss="cross_entropy",
        local=True,
        optimizer="adam",
        learning_rate=1e-3,
        memory_budget_bytes=8 * 2**20,
        time_budget_s=3,
        on_event=lambda event: events.append(event["event"]),
    )
    assert isinstance(recipe, bc.Recipe) and recipe.id is None
    assert 1 <= recipe.micro_batch_size <= recipe.max_feasible_batch_size <= 512
    assert recipe.memory.budget_bytes == 8 * 2**20 and recipe.steps_per_epoch >= 1
    assert "phase" in events and "trial" in events
