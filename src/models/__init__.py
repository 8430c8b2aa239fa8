"""The networks, by name: each entry says how to build it, which train.py flags shape it, and its memory.

To add a network, write its module here and add one entry to NETWORKS (docs/recipe.md, "Add a network").
Code elsewhere asks this registry instead of naming networks, and reads it when called, so an entry added
at run time (a test's, a plug-in's) is as good as these.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, KeysView
from dataclasses import dataclass
from functools import partial

from torch import nn

from .resnet34_unet import DEFAULT_DECODER_CHANNELS, RESNET18_LAYERS, ResNet34UNet, ResNetUNet
from .unet import UNet


@dataclass(frozen=True)
class Option:
    """A train.py flag a network takes, and the constructor argument it becomes."""

    flag: str
    kwarg: str
    default: object = False  # the argument when train.py's value is None: the flag was not given (--decoder-channels)

    @property
    def dest(self) -> str:
        """The flag's attribute in train.py's parsed arguments."""
        return self.flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class Network:
    """A registry entry. saved_mib_per_image_256: the tensors a training step keeps for the backward pass, MiB
    per image at 256², (float32, bfloat16 autocast), as `python benchmarks/model_stats.py` measures them with
    default options; None has models.stats measure them when a run needs them (see saved_mib_per_image)."""

    build: Callable[..., nn.Module]
    options: tuple[Option, ...] = ()
    saved_mib_per_image_256: tuple[float, float] | None = None

    def takes(self, flag: str) -> bool:
        return any(option.flag == flag for option in self.options)


DEEP_SUPERVISION = Option("--deep-supervision", "deep_supervision")
RESNET_UNET_OPTIONS = (
    DEEP_SUPERVISION,
    Option("--decoder-channels", "decoder_channels", DEFAULT_DECODER_CHANNELS),
    Option("--full-res-skip", "full_resolution_skip"),
)

NETWORKS: dict[str, Network] = {
    "unet": Network(UNet, (DEEP_SUPERVISION,), (327.0, 171.0)),
    "resnet34_unet": Network(ResNetUNet, RESNET_UNET_OPTIONS, (92.0, 47.0)),
    "resnet18_unet": Network(partial(ResNetUNet, encoder_layers=RESNET18_LAYERS), RESNET_UNET_OPTIONS, (80.0, 41.0)),
}
# A view, not a copy: names registered after import are valid choices and checkpoint networks too.
MODEL_NAMES: KeysView[str] = NETWORKS.keys()


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the model registered as `name` with the given constructor kwargs."""
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return NETWORKS[name].build(**kwargs)


def model_kwargs(name: str, flags: argparse.Namespace) -> dict:
    """The constructor arguments train.py's flags give the network, as plain types (a checkpoint keeps them,
    and loads with weights_only=True)."""
    kwargs = {}
    for option in NETWORKS[name].options:
        value = getattr(flags, option.dest)
        value = option.default if value is None else value
        kwargs[option.kwarg] = list(value) if isinstance(value, tuple) else value
    return kwargs


def networks_taking(flag: str) -> list[str]:
    """The networks that take a train.py flag, in registry order."""
    return [name for name, network in NETWORKS.items() if network.takes(flag)]


def refused_options(name: str, flags: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The flags given that shape other networks but not this one, each with the networks that take it."""
    options = {option.flag: option for network in NETWORKS.values() for option in network.options}
    return [
        (flag, networks_taking(flag))
        for flag, option in options.items()
        if not NETWORKS[name].takes(flag) and getattr(flags, option.dest) not in (None, False)
    ]


__all__ = [
    "MODEL_NAMES", "NETWORKS", "Network", "Option", "ResNet34UNet", "ResNetUNet", "UNet", "build_model",
    "model_kwargs", "networks_taking", "refused_options",
]
