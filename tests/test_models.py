import pytest
import torch
import torchvision
from torch import nn

import train
from models import MODEL_NAMES, NETWORKS, ResNet34UNet, UNet, build_model, model_kwargs, networks_taking
from models.resnet34_unet import RESNET18_LAYERS, RESNET34_LAYERS, ResNet34Encoder, ResNetEncoder
from models.stats import count_flops, count_parameters

# Exact count of the classic 64..1024 UNet with bias-free 3x3 convs + BN: any
# change in widths, depth or layer types moves it by far more than zero.
UNET_PARAMS = 31_037_633


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return build_model(request.param).eval()


@pytest.mark.parametrize("size", [(256, 256), (250, 190), (65, 97)])
@torch.no_grad()
def test_output_matches_input_size(model: nn.Module, size: tuple[int, int]) -> None:
    batch = 1 if isinstance(model, UNet) else 2
    y = model(torch.randn(batch, 3, *size))
    assert y.shape == (batch, 1, *size)


def test_unet_parameter_count() -> None:
    assert sum(p.numel() for p in UNet().parameters()) == UNET_PARAMS


def test_other_channel_counts() -> None:
    model = build_model("resnet34_unet", in_channels=4, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 48)).shape == (1, 2, 64, 48)


def _randomize_bn(net: nn.Module) -> None:
    # Default BN stats are an identity map, which would hide a swapped bn1/bn2.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                nn.init.uniform_(t.data, -0.5, 0.5)
            nn.init.uniform_(m.running_var, 0.5, 1.5)


@pytest.mark.parametrize(
    "torchvision_resnet, encoder_class, layers",
    [(torchvision.models.resnet34, ResNet34Encoder, RESNET34_LAYERS),
     (torchvision.models.resnet18, ResNetEncoder, RESNET18_LAYERS)],
)
@torch.no_grad()
def test_encoder_matches_torchvision_resnet(torchvision_resnet, encoder_class: type, layers: tuple) -> None:
    torch.manual_seed(0)
    ref = torchvision_resnet(weights=None)
    _randomize_bn(ref)
    ref.eval()
    encoder = encoder_class(layers=layers).eval()
    encoder.load_state_dict(
        {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, strict=True
    )

    x = torch.randn(2, 3, 96, 80)
    features = encoder(x)
    expected = [ref.relu(ref.bn1(ref.conv1(x)))]
    expected.append(ref.layer1(ref.maxpool(expected[0])))
    for layer in (ref.layer2, ref.layer3, ref.layer4):
        expected.append(layer(expected[-1]))
    for got, want in zip(features, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="no_such_net") as info:
        build_model("no_such_net")
    assert all(name in str(info.value) for name in MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_flag_a_network_declares_builds_it(name: str) -> None:
    """Each option's flag exists in train.py and its value reaches a constructor argument the network has."""
    for option in NETWORKS[name].options:
        assert option.flag in train.build_parser().format_help(), option.flag
    flags = train.build_parser().parse_args(["-n", name])
    with torch.device("meta"):
        build_model(name, **model_kwargs(name, flags))


def test_flags_give_the_constructor_arguments_that_checkpoints_already_hold() -> None:
    def kwargs(*argv: str) -> dict:
        flags = train.build_parser().parse_args(list(argv))
        return model_kwargs(flags.network, flags)

    assert kwargs("-n", "unet") == {"deep_supervision": False}
    assert kwargs() == {
        "deep_supervision": False, "decoder_channels": [256, 128, 64, 32, 16], "full_resolution_skip": False,
    }
    assert kwargs("--deep-supervision", "--full-res-skip", "--decoder-channels", "8", "8", "8", "8", "4") == {
        "deep_supervision": True, "decoder_channels": [8, 8, 8, 8, 4], "full_resolution_skip": True,
    }


def test_resnet18_and_resnet34_unets_differ_by_their_encoder_stages_alone() -> None:
    with torch.device("meta"):
        resnet18, resnet34 = build_model("resnet18_unet").state_dict(), ResNet34UNet().state_dict()
    assert set(resnet18) < set(resnet34)
    assert all(resnet18[key].shape == resnet34[key].shape for key in resnet18)
    assert {key.split(".")[1] for key in set(resnet34) - set(resnet18)} == {"layer1", "layer2", "layer3", "layer4"}


def test_build_model_passes_kwargs() -> None:
    model = build_model("unet", base_channels=8)
    assert model.head.in_channels == 8


def test_resnet34_unet_gradients_finite() -> None:
    torch.manual_seed(0)
    model = ResNet34UNet().train()
    x = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_flop_count_is_two_per_multiply_add_and_needs_no_real_weights() -> None:
    with torch.device("meta"):
        conv = nn.Conv2d(3, 1, kernel_size=1, bias=False)
        assert count_flops(conv, image_size=8) == 2 * 3 * 8 * 8
    assert count_parameters(conv) == 3


@pytest.mark.parametrize("name", networks_taking("--deep-supervision"))
def test_deep_supervision_adds_coarse_heads_in_training_only(name: str) -> None:
    torch.manual_seed(0)
    plain = build_model(name).eval()
    torch.manual_seed(0)
    supervised = build_model(name, deep_supervision=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # Same seed, same shared weights: in eval mode the heads change nothing.
        assert torch.equal(supervised.eval()(x), plain(x))
    logits, aux = supervised.train()(x)
    assert logits.shape == (2, 1, 64, 64)
    # Coarse to fine, every decoder stage below the output's resolution.
    expected = [8, 16, 32] if name == "unet" else [4, 8, 16, 32]
    assert [a.shape[-1] for a in aux] == expected and all(a.shape[:2] == (2, 1) for a in aux)


def test_full_resolution_skip_feeds_the_last_decoder_block_from_the_input() -> None:
    model = ResNet34UNet(full_resolution_skip=True, decoder_channels=(64, 32, 16, 16, 8)).eval()
    assert model.decoder[-1].conv[0].in_channels == 16 + 8
    x = torch.randn(1, 3, 65, 97, requires_grad=True)
    model(x).sum().backward()
    assert model.input_skip[0].weight.grad.abs().sum() > 0
    assert ResNet34UNet().input_skip is None and ResNet34UNet().decoder[-1].conv[0].in_channels == 32
