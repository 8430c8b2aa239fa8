"""Model registry: build a segmentation network by name."""

from torch import nn

from .resnet34_unet import ResNet34UNet
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "resnet34_unet": ResNet34UNet}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the model registered as `name` with the given constructor kwargs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "MODEL_NAMES", "ResNet34UNet", "UNet", "build_model"]
