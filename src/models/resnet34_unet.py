"""UNet on a ResNet-18 or ResNet-34 encoder whose parameter names match torchvision's resnet18/resnet34."""

import torch
from torch import nn

from .unet import DoubleConv, auxiliary_heads, init_weights
from .upsample import resize_bilinear


class BasicBlock(nn.Module):
    """ResNet basic residual block (two 3x3 convs)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# BasicBlocks in each of the four stages: the two depths torchvision builds from BasicBlock.
RESNET18_LAYERS = (2, 2, 2, 2)
RESNET34_LAYERS = (3, 4, 6, 3)


class ResNetEncoder(nn.Module):
    """ResNet-18/34 (by `layers`) without avgpool/fc; returns features at strides 2, 4, 8, 16, 32."""

    out_channels = (64, 64, 128, 256, 512)

    def __init__(self, in_channels: int = 3, layers: tuple[int, int, int, int] = RESNET34_LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(64, 64, layers[0], stride=1)
        self.layer2 = _make_stage(64, 128, layers[1], stride=2)
        self.layer3 = _make_stage(128, 256, layers[2], stride=2)
        self.layer4 = _make_stage(256, 512, layers[3], stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f2 = self.relu(self.bn1(self.conv1(x)))
        f4 = self.layer1(self.maxpool(f2))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return [f2, f4, f8, f16, f32]


class DecoderBlock(nn.Module):
    """Bilinear upsample to the target size, optionally concatenate a skip, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, size: torch.Size, skip: torch.Tensor | None = None) -> torch.Tensor:
        # Interpolating to an explicit size (not scale_factor=2) keeps odd input sizes aligned.
        x = resize_bilinear(x, size)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


# Halving the width each time resolution doubles keeps every skip block at about
# 0.6 GMAC at 256x256, and the two highest-resolution blocks (32, 16) stay cheap:
# with (256,128,64,32,16) the forward pass is about 15.5 GFLOP, i.e. ~47 GFLOP per
# training step, the project budget. Widening the last two to (64, 32) costs about
# +4.8 GFLOP per forward (~+30%) for layers that only refine boundaries.
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ResNetUNet(nn.Module):
    """UNet decoder on a ResNet encoder (ResNet-34 unless encoder_layers says otherwise), returning logits at
    the input's size.

    The encoder's first features are at half resolution (its 7x7 stride-2 stem), so the last decoder
    block has no skip unless full_resolution_skip adds one: a DoubleConv on the input image, as wide
    as that block. deep_supervision works as in UNet.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS,
        full_resolution_skip: bool = False,
        deep_supervision: bool = False,
        encoder_layers: tuple[int, int, int, int] = RESNET34_LAYERS,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {decoder_channels}")
        self.encoder = ResNetEncoder(in_channels, encoder_layers)
        enc = self.encoder.out_channels
        skip_channels = (enc[3], enc[2], enc[1], enc[0], decoder_channels[-1] if full_resolution_skip else 0)
        in_widths = (enc[4], *decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(c_in, c_skip, c_out)
            for c_in, c_skip, c_out in zip(in_widths, skip_channels, decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)
        self.input_skip = DoubleConv(in_channels, decoder_channels[-1]) if full_resolution_skip else None
        init_weights(self)
        # Made last, so that a seed starts the shared layers from the same weights with or without them.
        self.aux_heads = auxiliary_heads(decoder_channels[:-1], out_channels, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        *skips, y = self.encoder(x)
        stages = []
        for block, skip in zip(self.decoder[:-1], reversed(skips), strict=True):
            y = block(y, skip.shape[-2:], skip)
            stages.append(y)
        full_resolution = self.input_skip(x) if self.input_skip is not None else None
        logits = self.head(self.decoder[-1](y, x.shape[-2:], full_resolution))
        if self.aux_heads is None or not self.training:
            return logits
        return logits, [head(stage) for head, stage in zip(self.aux_heads, stages, strict=True)]


# The names of the default depth, which the tests and code written against earlier versions import.
ResNet34Encoder = ResNetEncoder
ResNet34UNet = ResNetUNet
