"""Every zoo model takes a real training step: forward, loss, backward, optimizer step."""

import pytest
import torch

from models import get_model, list_models, make_config

SMALL = {
    "mlp": {"hidden_dims": [16, 16]},
    "resnet": {"width": 8, "image_size": 16},
    "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 64},
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


def test_small_configs_cover_the_zoo():
    assert sorted(SMALL) == sorted(spec.name for spec in list_models())


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_step_updates_parameters(name, optimizer):
    spec = get_model(name)
    config = make_config(spec, SMALL[name])
    torch.manual_seed(0)
    model = spec.build(config, False).train()
    opt = OPTIMIZERS[optimizer](model.parameters())
    inputs, targets = spec.make_batch(config, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]

    for _ in range(2):  # the second step runs with optimizer state in place, as the probes do
        loss = spec.loss(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    assert loss.ndim == 0 and torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} parameter tensors did not move"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_matches_the_declared_contract(name):
    spec = get_model(name)
    config = make_config(spec, SMALL[name])
    inputs, targets = spec.make_batch(config, 3, torch.device("cpu"), torch.Generator().manual_seed(1))

    assert list(inputs.shape) == [3, *spec.input_shape(config)]
    assert inputs.dtype == getattr(torch, spec.input_dtype)
    assert targets.dtype == torch.int64
    assert int(targets.min()) >= 0 and int(targets.max()) < spec.num_classes(config)
    if spec.input_dtype == "int64":
        assert int(inputs.max()) < spec.num_classes(config)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_is_deterministic_given_the_generator(name):
    spec = get_model(name)
    config = make_config(spec, SMALL[name])
    a = spec.make_batch(config, 4, "cpu", torch.Generator().manual_seed(7))
    b = spec.make_batch(config, 4, "cpu", torch.Generator().manual_seed(7))
    c = spec.make_batch(config, 4, "cpu", torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    spec = get_model(name)
    config = make_config(spec, SMALL[name])
    assert spec.supports_gradient_checkpointing
    torch.manual_seed(0)
    plain = spec.build(config, False).train()
    checkpointed = spec.build(config, True).train()
    checkpointed.load_state_dict(plain.state_dict())
    inputs, targets = spec.make_batch(config, 2, "cpu", torch.Generator().manual_seed(0))

    losses = []
    for model in (plain, checkpointed):
        loss = spec.loss(model(inputs), targets)
        loss.backward()
        losses.append(loss.detach())

    torch.testing.assert_close(losses[0], losses[1])
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_mlp_refuses_gradient_checkpointing():
    spec = get_model("mlp")
    assert not spec.supports_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient checkpointing"):
        spec.build(make_config(spec, {}), True)
