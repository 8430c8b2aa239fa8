"""The training augmentation: the --augment presets, their random choices (drawn on the CPU, apart from
applying them, so processes draw in step and a resumed run draws the same) and applying them to whole batches
on the training device, the Affine operations as one grid_sample (docs/recipe.md#augmentation-presets)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from devices import device_constant

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
Params = dict[str, torch.Tensor]


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}"


# ----------------------------------------------------------------------------- operations


class Operation(ABC):
    """One kind of random change to a batch: what it draws for each image, and how it reads in --augment's help."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Params:
        """Its parameters for n images, each a float tensor (n, ...) (or one that float32 holds exactly),
        drawn from `generator` on the CPU."""

    @abstractmethod
    def describe(self) -> str:
        """What it does, for --augment's help and docs/recipe.md; empty when it changes nothing."""

    def area_kept(self) -> float:
        """The smallest fraction of its input's area that its output may show: crop_source_size makes the
        source big enough for that fraction to still have the training size's pixels."""
        return 1.0


class Transform(Operation):
    """An operation that applies itself, in its place in the preset."""

    @abstractmethod
    def apply(self, images: torch.Tensor, masks: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (N, 3, H, W) in [0, 1] and float {0, 1} masks (N, 1, H, W), changed as `params` (on their
        device) say; masks must stay {0, 1}."""


class Affine(Operation):
    """A geometric operation: a map per image, composed with the preset's other Affine operations into one
    resampling of the batch."""

    # Whether some of its output comes from outside its input, which torchvision fills with 0.
    fills = False

    @abstractmethod
    def matrix(self, params: Params) -> torch.Tensor:
        """(n, 3, 3) homogeneous maps from output to input coordinates (both in [-1, 1]), on the CPU."""


def _identity(n: int) -> torch.Tensor:
    return torch.eye(3).repeat(n, 1, 1)


@dataclass(frozen=True)
class RandomResizedCrop(Affine):
    """torchvision's RandomResizedCrop of a square image, resized to the training size."""

    scale: tuple[float, float]  # area of the crop, as a fraction of the image
    ratio: tuple[float, float]  # its aspect ratio, width / height

    def sample(self, n: int, generator: torch.Generator) -> Params:
        """The crop in fractions of the side: centre cx, cy, width, height. As torchvision draws: up to 10 tries
        of area and log-uniform aspect ratio, the first that fits wins, else the whole image."""
        tries = 10
        area = _uniform(*self.scale, n * tries, generator).view(n, tries)
        low, high = (math.log(ratio) for ratio in self.ratio)
        ratio = torch.exp(_uniform(low, high, n * tries, generator).view(n, tries))
        width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (width <= 1) & (height <= 1)
        found, first = fits.any(1), fits.int().argmax(dim=1)[:, None]
        width, height = (torch.where(found, side.gather(1, first)[:, 0], torch.ones(n)) for side in (width, height))
        cx, cy = (side / 2 + (1 - side) * torch.rand(n, generator=generator) for side in (width, height))
        return {"cx": cx, "cy": cy, "width": width, "height": height}

    def matrix(self, params: Params) -> torch.Tensor:
        matrix = _identity(len(params["cx"]))
        matrix[:, 0, 0], matrix[:, 1, 1] = params["width"], params["height"]
        matrix[:, 0, 2], matrix[:, 1, 2] = 2 * params["cx"] - 1, 2 * params["cy"] - 1
        return matrix

    def describe(self) -> str:
        fractions = [Fraction(ratio).limit_denominator(10) for ratio in self.ratio]
        aspect = "–".join(f"{fraction.numerator}:{fraction.denominator}" for fraction in fractions)
        return f"random crop of {_percent(self.scale[0])}–{_percent(self.scale[1])} % of the area at aspect {aspect}"

    def area_kept(self) -> float:
        return self.scale[0]


@dataclass(frozen=True)
class HorizontalFlip(Affine):
    """A mirror image, for half the images."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"sign": torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)}

    def matrix(self, params: Params) -> torch.Tensor:
        matrix = _identity(len(params["sign"]))
        matrix[:, 0, 0] = params["sign"]
        return matrix

    def describe(self) -> str:
        return "horizontal flip"


@dataclass(frozen=True)
class Rotation(Affine):
    """A rotation about the centre by an angle drawn from [-degrees, degrees]; the corners it brings in are 0."""

    degrees: float
    fills = True

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"angle": torch.deg2rad(_uniform(-self.degrees, self.degrees, n, generator))}

    def matrix(self, params: Params) -> torch.Tensor:
        angle = params["angle"]
        matrix = _identity(len(angle))
        matrix[:, 0, 0], matrix[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        matrix[:, 1, 0], matrix[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        return matrix

    def describe(self) -> str:
        return f"rotation up to ±{self.degrees:g}°" if self.degrees else ""


@dataclass(frozen=True)
class ColorJitter(Transform):
    """Brightness, then contrast, then saturation, each scaled by a factor drawn from [1 - strength, 1 + strength]
    per image, as torchvision's adjust_* do."""

    strength: float
    factors = ("brightness", "contrast", "saturation")  # drawn, and applied, in this order

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {name: _uniform(1 - self.strength, 1 + self.strength, n, generator) for name in self.factors}

    def apply(self, images: torch.Tensor, masks: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        brightness, contrast, saturation = (params[name].view(-1, 1, 1, 1) for name in self.factors)
        weights = device_constant(GRAY_WEIGHTS, images.device)
        images = (images * brightness).clamp(0, 1)
        gray_mean = (images * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        images = (gray_mean + (images - gray_mean) * contrast).clamp(0, 1)
        gray = (images * weights).sum(1, keepdim=True)
        images = (gray + (images - gray) * saturation).clamp(0, 1)
        return images, masks

    def describe(self) -> str:
        return f"brightness, contrast and saturation jitter of ±{_percent(self.strength)} %" if self.strength else ""


def _compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """first @ then for batches of 3x3 maps, as plain products and sums: a matmul backend may round float32
    more coarsely (TF32, bf16), and the choices must be the same numbers on every machine."""
    return (first[:, :, :, None] * then[:, None, :, :]).sum(dim=2)


@dataclass(frozen=True)
class _Warp:
    """A preset's Affine operations as one step: their maps composed on the CPU at sampling, applied with one
    grid_sample (a plain resize to the training size when there are none)."""

    ops: tuple[Affine, ...]

    def sample(self, n: int, generator: torch.Generator) -> Params:
        """The composed map `theta` (n, 2, 3); where an operation fills, also `fills` (n, k, 2, 3): the map from
        the output to each filling operation's input, which tells where that input ends."""
        drawn = [op.sample(n, generator) for op in self.ops]
        theta, fills = _identity(n), []
        for op, params in reversed(list(zip(self.ops, drawn, strict=True))):  # from the output back
            theta = _compose(op.matrix(params), theta)
            if op.fills:
                fills.append(theta[:, :2])
        choices = {"theta": theta[:, :2]}
        if fills:
            choices["fills"] = torch.stack(fills, dim=1)
        return choices

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, params: Params, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(images)
        grid = F.affine_grid(params["theta"], [n, 1, size, size], align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if "fills" in params:
            k = params["fills"].shape[1]
            grids = F.affine_grid(params["fills"].flatten(0, 1), [n * k, 1, size, size], align_corners=False)
            inside = (grids.abs() <= 1).all(dim=-1).view(n, k, size, size).all(dim=1, keepdim=True)
            images, masks = images * inside, masks * inside
        return images, masks


# ----------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class Choices:
    """A batch's random choices: for each step of its preset, named tensors (n, ...), one row per image."""

    steps: tuple[Params, ...]

    def __getitem__(self, index: slice) -> Choices:
        """The choices of some of the images, e.g. one process's share of a global batch."""
        return Choices(tuple({name: tensor[index] for name, tensor in params.items()} for params in self.steps))

    def pack(self) -> torch.Tensor:
        """All choices as one (n, width) float32 tensor, each in columns of its own: a whole epoch's choices
        travel to the GPU in one copy."""
        return torch.cat([
            tensor.reshape(len(tensor), math.prod(tensor.shape[1:])).float()
            for params in self.steps for tensor in params.values()
        ], dim=1)

    def unpack(self, packed: torch.Tensor) -> Choices:
        """Choices laid out as these, read back from `packed` (as views of it, on whatever device it is)."""
        widths = [math.prod(tensor.shape[1:]) for params in self.steps for tensor in params.values()]
        columns = iter(packed.split(widths, dim=1))
        return Choices(tuple(
            {name: next(columns).view(-1, *tensor.shape[1:]).to(tensor.dtype) for name, tensor in params.items()}
            for params in self.steps
        ))


# ----------------------------------------------------------------------------- presets


class Augmentation:
    """A preset: its operations in the order they act, as torchvision's presets list them. The Affine ones
    must stand together; they become one resampling to the training size, which every preset has."""

    def __init__(self, ops: Sequence[Operation]) -> None:
        if not all(isinstance(op, (Affine, Transform)) for op in ops):
            raise TypeError("an augmentation's operations must each be an augment.Affine or augment.Transform")
        affine = [i for i, op in enumerate(ops) if isinstance(op, Affine)]
        if affine and affine != list(range(affine[0], affine[-1] + 1)):
            raise ValueError("an augmentation's Affine operations must stand together: they are applied as one")
        self.ops = tuple(ops)
        at = affine[0] if affine else 0
        self.steps = (*ops[:at], _Warp(tuple(op for op in ops if isinstance(op, Affine))), *ops[at + len(affine):])

    def describe(self) -> str:
        """What the preset does, in order, for --augment's help and docs/recipe.md."""
        return ", ".join(filter(None, (op.describe() for op in self.ops)))

    def sample(self, n: int, generator: torch.Generator) -> Choices:
        """Draw the choices for n images from `generator` (a CPU generator, so a run can be resumed exactly),
        operation after operation."""
        return Choices(tuple(step.sample(n, generator) for step in self.steps))

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, choices: Choices, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, 3, M, M) and masks (N, 1, M, M) to augmented float images in [0, 1] (N, 3, size, size)
        and float {0, 1} masks (N, 1, size, size), on their device, where `choices` must be too (Choices.unpack
        puts them there in one copy); oxford_pet.normalize then makes the images model input."""
        images, masks = images.float() / 255, masks.float()
        for step, params in zip(self.steps, choices.steps, strict=True):
            if isinstance(step, _Warp):
                images, masks = step.apply(images, masks, params, size)
            else:
                images, masks = step.apply(images, masks, params)
        return images, masks


AUGMENTATIONS: dict[str, Augmentation] = {
    "light": Augmentation([
        RandomResizedCrop(scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)),
        HorizontalFlip(),
        # Nothing rotated or jittered, but the draws stay: light runs (and their last.pt) go on as they were.
        Rotation(degrees=0.0),
        ColorJitter(strength=0.0),
    ]),
    "default": Augmentation([
        RandomResizedCrop(scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
        HorizontalFlip(),
        Rotation(degrees=10.0),
        ColorJitter(strength=0.3),
    ]),
    "strong": Augmentation([
        RandomResizedCrop(scale=(0.3, 1.0), ratio=(2 / 3, 3 / 2)),
        HorizontalFlip(),
        Rotation(degrees=20.0),
        ColorJitter(strength=0.4),
    ]),
}
DEFAULT_AUGMENTATION = AUGMENTATIONS["default"]


def crop_source_size(image_size: int, augmentation: Augmentation = DEFAULT_AUGMENTATION) -> int:
    """Side of the square training crops are taken from: a square crop of the smallest area the augmentation
    keeps still has image_size pixels a side (the narrowest, 3:4 by default, are stretched up to 1.15x)."""
    return math.ceil(image_size / math.sqrt(math.prod(op.area_kept() for op in augmentation.ops)))
