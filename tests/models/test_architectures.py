"""Architecture details: output shapes, torchvision/nanoGPT parameter counts, stems, ResNet-50."""

import pytest
import torch

from models import GPTConfig, MLPConfig, ResNetConfig, get_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, config) -> torch.nn.Module:
    """Build without allocating or initialising real weights: counting parameters is instant."""
    with torch.device("meta"):
        return get_model(name).build(config, False)


def test_mlp_defaults_fit_digits_and_output_logits():
    config = MLPConfig()
    assert (config.input_dim, config.num_classes) == (64, 10)
    model = get_model("mlp").build(config, False)
    assert model(torch.randn(5, 64)).shape == (5, 10)


def test_mlp_without_hidden_layers_is_logistic_regression():
    model = get_model("mlp").build(MLPConfig(hidden_dims=()), False)
    assert n_params(model) == 64 * 10 + 10


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)],  # torchvision resnet18/34/50
)
def test_resnet_parameter_counts_match_torchvision(depth, expected):
    config = ResNetConfig(depth=depth, stem="imagenet", num_classes=1000)
    assert n_params(build_on_meta("resnet", config)) == expected


def test_gpt2_small_parameter_count_matches_nanogpt():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    assert n_params(build_on_meta("gpt", config)) == 124_439_808  # with tied lm_head


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet_output_shape_for_each_stem(stem):
    config = ResNetConfig(width=8, image_size=32, num_classes=7, stem=stem)
    model = get_model("resnet").build(config, False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_imagenet_stem_downsamples_by_four_before_the_first_stage():
    model = get_model("resnet").build(ResNetConfig(width=8, stem="imagenet"), False)
    stem_out = model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert stem_out.shape == (1, 8, 8, 8)
    assert model.conv1.kernel_size == (7, 7)


def test_cifar_stem_keeps_full_resolution():
    model = get_model("resnet").build(ResNetConfig(width=8), False)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_resnet50_builds_and_takes_an_adam_step_on_small_images():
    spec = get_model("resnet")
    config = ResNetConfig(depth=50, image_size=16, in_channels=1, num_classes=5, width=16)
    model = spec.build(config, True)
    assert model.fc.in_features == 16 * 8 * 4  # last stage is width x 8, bottleneck expands x4
    opt = torch.optim.Adam(model.parameters())
    inputs, targets = spec.make_batch(config, 2, "cpu", torch.Generator().manual_seed(0))
    loss = spec.loss(model(inputs), targets)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.fc.weight.grad is not None


def test_gpt_logits_shape_weight_tying_and_shorter_sequences():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = get_model("gpt").build(config, False)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(torch.randint(32, (3, 8))).shape == (3, 8, 32)
    assert model(torch.randint(32, (3, 5))).shape == (3, 5, 32)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(32, (1, 9)))


def test_gpt_targets_are_inputs_shifted_by_one():
    config = GPTConfig(block_size=8)
    inputs, targets = get_model("gpt").make_batch(config, 2, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_gpt_initial_loss_is_near_uniform():
    """Small init (std 0.02) means the untrained model predicts ~uniformly: loss ~ ln(vocab_size)."""
    spec = get_model("gpt")
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    inputs, targets = spec.make_batch(config, 4, "cpu", torch.Generator().manual_seed(0))
    loss = spec.loss(spec.build(config, False)(inputs), targets)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1
