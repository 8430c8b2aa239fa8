"""Classic UNet (Ronneberger et al., 2015) with batch norm and size-agnostic skips."""

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            # No conv bias: the following BN's shift makes it redundant.
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def init_weights(module: nn.Module) -> None:
    """Kaiming (fan_out) init for convs, identity init for BN, as torchvision's ResNet does."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Up(nn.Module):
    """Transposed-conv upsample by 2, zero-padded on the bottom/right to the skip's size, concatenate the skip,
    DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Floor-mode pooling of an odd size loses at most one row/column per level,
        # so the upsampled map is short by at most one and never larger.
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, (0, dw, 0, dh))
        return self.conv(torch.cat([skip, x], dim=1))


def auxiliary_heads(widths: list[int], out_channels: int, enabled: bool) -> nn.ModuleList | None:
    """1x1 logit heads on decoder stages, for deep supervision; None when it is off."""
    if not enabled:
        return None
    heads = nn.ModuleList(nn.Conv2d(width, out_channels, kernel_size=1) for width in widths)
    init_weights(heads)
    return heads


class UNet(nn.Module):
    """4-level UNet returning logits at the input's size; H and W must be at least 16.

    With deep_supervision, a model in training mode returns (logits, [logits of each coarser decoder
    stage, coarse to fine]); in eval mode it returns the logits alone, as without it.
    """

    def __init__(
        self, in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, deep_supervision: bool = False
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(5)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_out))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.ups = nn.ModuleList(
            Up(c_in, c_out) for c_in, c_out in zip(widths[:0:-1], widths[-2::-1], strict=True)
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        init_weights(self)
        # Made last, so that a seed starts the shared layers from the same weights with or without them.
        self.aux_heads = auxiliary_heads(widths[-2:0:-1], out_channels, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        stages = []
        for up in self.ups:
            x = up(x, skips.pop())
            stages.append(x)
        logits = self.head(x)
        if self.aux_heads is None or not self.training:
            return logits
        return logits, [head(stage) for head, stage in zip(self.aux_heads, stages[:-1], strict=True)]
