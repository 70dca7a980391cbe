"""The client's optimizer settings and training horizon: validated, stored, fingerprinted, handed on."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.probing.spec import training_options
from service.recommendations.service import probe_spec_from_request

MLP = {"model": {"name": "mlp"}}


def _post(client: TestClient, training: dict) -> object:
    return client.post("/v1/recommendations", json={**MLP, "training": training})


def test_optimizer_settings_and_horizon_are_stored_and_change_the_fingerprint(client: TestClient) -> None:
    plain = _post(client, {"optimizer": "sgd", "momentum": 0.0, "epochs": 30})
    assert plain.status_code == 202, plain.text
    stored = plain.json()["request"]["training"]
    assert (stored["momentum"], stored["epochs"], stored["target_loss"]) == (0.0, 30, None)
    default = _post(client, {"optimizer": "sgd", "epochs": 30}).json()
    assert default["request"]["training"]["momentum"] == 0.9  # sgd's documented default
    assert default["fingerprint"] != plain.json()["fingerprint"]

    adamw = _post(
        client, {"optimizer": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.1, "target_loss": 1.5}
    ).json()
    assert adamw["request"]["training"]["betas"] == [0.9, 0.95]
    other = _post(
        client, {"optimizer": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.1, "target_loss": 1.5}
    )
    assert other.json()["fingerprint"] != adamw["fingerprint"]


def test_bad_optimizer_settings_get_a_422_naming_the_field(client: TestClient) -> None:
    for training, field in [
        ({"momentum": 1.0}, "training.momentum"),
        ({"momentum": -0.1}, "training.momentum"),
        ({"betas": [0.9]}, "training.betas"),
        ({"betas": [0.9, 1.0]}, "training.betas"),
        ({"eps": 0}, "training.eps"),
        ({"weight_decay": -1}, "training.weight_decay"),
        ({"epochs": 0}, "training.epochs"),
    ]:
        response = _post(client, training)
        assert response.status_code == 422, training
        assert response.json()["error"]["details"][0]["field"].startswith(field), response.text
    for training, words in [
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov"),
        ({"epochs": 3, "target_loss": 0.5}, "at most one"),
    ]:
        response = _post(client, training)
        assert response.status_code == 422, training
        assert words in response.json()["error"]["message"], response.text


def test_the_probe_spec_carries_the_settings(client: TestClient) -> None:
    job = _post(client, {"optimizer": "adamw", "betas": [0.8, 0.95], "eps": 1e-6, "epochs": 4}).json()
    host = client.app.state.batchsize.host
    spec = probe_spec_from_request(job["request"], host=host)
    assert (spec.betas, spec.eps, spec.epochs, spec.target_loss) == ([0.8, 0.95], 1e-6, 4, None)
    assert spec.optimizer_options() == {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0}
    # A request stored before these fields existed keeps the probe's defaults.
    assert training_options({"optimizer": "sgd"}) == {}


def test_a_local_run_builds_the_same_spec_as_the_worker(client: TestClient) -> None:
    from service.local import local_probe_spec

    job = _post(client, {"optimizer": "adam", "learning_rate": 0.01, "epochs": 2}).json()
    request = job["request"]
    settings = {
        **request["training"],
        "dataset_size": request["dataset"]["size"],
        "device": None,
        "memory_budget_bytes": request["memory_budget_bytes"],
        "objective": request["objective"],
        "time_budget_s": request["time_budget_s"],
    }
    local = local_probe_spec("mlp", request["model"]["config"], None, {}, None, settings)
    served = probe_spec_from_request(request, host=client.app.state.batchsize.host)
    assert local.to_json_dict() == served.to_json_dict()


def test_the_training_loop_is_stored_fingerprinted_and_handed_on(client: TestClient) -> None:
    default = _post(client, {"optimizer": "adam"}).json()
    stored = default["request"]["training"]
    assert (stored["loop"], stored["prefetch_batches"]) == ("pytorch", 0)
    lightning = _post(client, {"optimizer": "adam", "loop": "lightning", "prefetch_batches": 1})
    assert lightning.status_code == 202, lightning.text
    job = lightning.json()
    assert job["request"]["training"]["loop"] == "lightning"
    assert job["fingerprint"] != default["fingerprint"]
    spec = probe_spec_from_request(job["request"], host=client.app.state.batchsize.host)
    assert (spec.loop, spec.prefetch_batches) == ("lightning", 1)
    for training, field in [
        ({"loop": "keras"}, "training.loop"),
        ({"prefetch_batches": -1}, "training.prefetch"),
    ]:
        response = _post(client, training)
        assert response.status_code == 422, training
        assert response.json()["error"]["details"][0]["field"].startswith(field), response.text
