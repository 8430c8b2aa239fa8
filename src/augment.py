"""The training augmentation, on whole batches on the training device, for every data source.

One grid_sample per batch: random resized crop, horizontal flip and rotation composed into one
affine map per image, sampled bilinearly for images and nearest for masks (so masks stay exactly
0/1), then brightness, contrast and saturation jitter with a factor per image. The ranges are an
oxford_pet.Augmentation (light, default or strong). Choices are drawn apart from applying them, so
that processes training together can draw for the whole global batch, in step, and each apply its
own share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from devices import device_constant, same_device
from oxford_pet import DEFAULT_AUGMENTATION, Augmentation

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_crops(
    n: int, generator: torch.Generator, recipe: Augmentation = DEFAULT_AUGMENTATION
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's choice for n square images, in fractions of the side: centre x, y, width, height.

    As torchvision does: up to 10 tries of area and log-uniform aspect ratio, the first that fits
    wins, else the whole image.
    """
    tries = 10
    area = _uniform(*recipe.crop_scale, n * tries, generator).view(n, tries)
    low, high = (math.log(ratio) for ratio in recipe.crop_ratio)
    log_ratio = _uniform(low, high, n * tries, generator).view(n, tries)
    ratio = torch.exp(log_ratio)
    width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (width <= 1) & (height <= 1)
    first = fits.int().argmax(dim=1)
    width = torch.where(fits.any(1), width.gather(1, first[:, None])[:, 0], torch.ones(n))
    height = torch.where(fits.any(1), height.gather(1, first[:, None])[:, 0], torch.ones(n))
    cx = width / 2 + (1 - width) * torch.rand(n, generator=generator)
    cy = height / 2 + (1 - height) * torch.rand(n, generator=generator)
    return cx, cy, width, height


def sample_geometry(
    n: int, generator: torch.Generator, recipe: Augmentation = DEFAULT_AUGMENTATION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (n, 2, 3) from output to input coordinates (both in [-1, 1]) for crop, then flip, then
    rotation; and the rotations alone, which tell where torchvision's rotation would fill with 0."""
    cx, cy, width, height = sample_crops(n, generator, recipe)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    angle = torch.deg2rad(_uniform(-recipe.rotation_degrees, recipe.rotation_degrees, n, generator))
    rotation = torch.zeros(n, 2, 3)
    rotation[:, 0, 0], rotation[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    rotation[:, 1, 0], rotation[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    # Output point -> rotated about the centre -> x flipped -> scaled into the crop -> moved to the crop's centre.
    theta = rotation * torch.stack([flip * width, height], dim=1)[:, :, None]
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 2] = 2 * cy - 1
    return theta, rotation


@dataclass
class Choices:
    """The random choices for a batch: geometry (crop, flip, rotation) and colour factors per image."""

    theta: torch.Tensor  # (n, 2, 3) output -> input coordinates
    rotation: torch.Tensor  # (n, 2, 3) the rotations alone
    brightness: torch.Tensor  # (n,)
    contrast: torch.Tensor
    saturation: torch.Tensor

    def __getitem__(self, index: slice) -> Choices:
        """The choices of some of the images, e.g. one process's share of a global batch."""
        return Choices(*(getattr(self, f.name)[index] for f in fields(self)))

    def pack(self) -> torch.Tensor:
        """All choices as one (n, 15) float32 tensor, so that a whole epoch's choices travel to the GPU in one copy."""
        return torch.cat([self.theta.flatten(1), self.rotation.flatten(1), self.brightness[:, None],
                          self.contrast[:, None], self.saturation[:, None]], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> Choices:
        """The inverse of pack, as views of `packed` (on whatever device it is)."""
        return cls(packed[:, :6].view(-1, 2, 3), packed[:, 6:12].view(-1, 2, 3), *packed[:, 12:15].unbind(1))


def sample_augmentation(
    n: int, generator: torch.Generator, recipe: Augmentation = DEFAULT_AUGMENTATION
) -> Choices:
    """Draw the choices for n images from `generator` (a CPU generator, so a run can be resumed exactly)."""
    theta, rotation = sample_geometry(n, generator, recipe)
    jitter = recipe.jitter
    brightness, contrast, saturation = (_uniform(1 - jitter, 1 + jitter, n, generator) for _ in range(3))
    return Choices(theta, rotation, brightness, contrast, saturation)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if same_device(tensor.device, device) else tensor.to(device)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(images - mean) / std per channel, with the constants made once per device (torchvision's
    normalize copies them to the device at every call)."""
    return (images - device_constant(tuple(mean), images.device)) / device_constant(tuple(std), images.device)


def apply_augmentation(
    images: torch.Tensor,
    masks: torch.Tensor,
    choices: Choices,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, M, M) and masks (N, 1, M, M), on any device, to augmented normalised
    float images (N, 3, size, size) and float {0, 1} masks (N, 1, size, size) on that device.
    Choices already on that device are used in place: nothing is copied at each step."""
    n, device = len(images), images.device
    shape = [n, 1, size, size]
    rotation, theta = _on(choices.rotation, device), _on(choices.theta, device)
    inside = (F.affine_grid(rotation, shape, align_corners=False).abs() <= 1).all(dim=-1)[:, None]
    grid = F.affine_grid(theta, shape, align_corners=False)
    images = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    images = images * inside
    masks = masks * inside

    brightness, contrast, saturation = (
        _on(factor, device).view(n, 1, 1, 1) for factor in (choices.brightness, choices.contrast, choices.saturation)
    )
    weights = device_constant(GRAY_WEIGHTS, device)
    images = (images * brightness).clamp(0, 1)
    gray_mean = (images * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    images = (gray_mean + (images - gray_mean) * contrast).clamp(0, 1)
    gray = (images * weights).sum(1, keepdim=True)
    images = (gray + (images - gray) * saturation).clamp(0, 1)
    return normalize(images, mean, std), masks


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator,
    recipe: Augmentation = DEFAULT_AUGMENTATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a whole batch: sample_augmentation, then apply_augmentation."""
    choices = sample_augmentation(len(images), generator, recipe)
    return apply_augmentation(images, masks, choices, size, mean, std)
