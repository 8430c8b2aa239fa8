"""Evaluate a model on a split: loss, per-image Dice (the headline), dataset-wide Dice and IoU,
at the model's input size and at each image's own size; the prediction function every script uses.

    python src/evaluate.py -m saved_models/RUN/best.pt --split valid [--tta]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import checkpoint as ckpt
import distributed
from cli import argument_parser, non_negative, positive
from devices import autocast, default_amp, non_blocking, read_once, select_device
from errors import PetsegError, display_path, run_script
from oxford_pet import (
    DEFAULT_DATA_PATH,
    SPLITS,
    OxfordPetSegmentation,
    build_transform,
    denormalize,
    normalize,
    prepare_dataset,
)
from utils import logits_to_mask, per_image_dice


def pixel_counts(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection, union, predicted and true pixels of boolean masks, as an int64 tensor on their device:
    counted exactly, and summed there without the host waiting."""
    return torch.stack([(pred & gt).sum(), (pred | gt).sum(), pred.sum(), gt.sum()])


@dataclass
class PooledPixels:
    """Pixel counts summed over images: the dataset-wide Dice and IoU, which weigh big pets more."""

    intersection: int = 0
    union: int = 0
    predicted: int = 0
    truth: int = 0

    @property
    def dice(self) -> float:
        total = self.predicted + self.truth
        return 2 * self.intersection / total if total else 1.0

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 1.0


@dataclass
class OriginalSizeScore:
    """One image scored at its own size: the prediction resized to the photo, against the untouched mask."""

    height: int
    width: int
    pet_pixels: int
    predicted_pixels: int
    dice: float


@dataclass
class EvalResult:
    loss: float
    dice: float  # mean over images of each image's Dice at the model's input size: the lab's number
    dataset_dice: float  # Dice of all pixels pooled, so big pets weigh more
    dataset_iou: float
    per_image_dice: list[float] = field(repr=False)
    image_size: tuple[int, int]  # (H, W) the model saw, and the masks were resized to
    tta: bool = False
    # The same scores at each image's own size; None when the loader gave no original masks.
    dice_original: float | None = None
    dataset_dice_original: float | None = None
    dataset_iou_original: float | None = None
    per_image_original: list[OriginalSizeScore] | None = field(default=None, repr=False)

    @property
    def size_label(self) -> str:
        """The model's input size as printed: H×W."""
        return "×".join(map(str, self.image_size))

    def summary(self) -> dict[str, object]:
        """The scores without the per-image lists, for results.json."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("per_image") and v is not None}


@torch.no_grad()  # here, not in each caller: the --input loop had none and kept every batch's autograd graph
def predict_logits(model: nn.Module, images: torch.Tensor, amp: bool = False, tta: bool = False) -> torch.Tensor:
    """Float32 pet logits (N, 1, H, W) of a batch of normalised images; threshold with logits_to_mask.
    With tta, the logit of the mean probability of each image and its mirror image (mirrored back), so resizing
    and thresholding treat both cases alike."""
    with autocast(images.device, amp):
        logits = [model(images).float()] + ([model(images.flip(-1)).float().flip(-1)] if tta else [])
    return logits[0] if len(logits) == 1 else mean_probability_logit(logits)


def mean_probability_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    """The logit of the mean of the sigmoid probabilities of several logit maps of one shape:
    logit(mean σ(aᵢ)) = log Σ σ(aᵢ) - log Σ σ(-aᵢ), in log space so that confident logits neither round
    to a probability of exactly 1 nor turn into infinities."""
    stacked = torch.stack(logits)
    return torch.logsumexp(F.logsigmoid(stacked), dim=0) - torch.logsumexp(F.logsigmoid(-stacked), dim=0)


class Ensemble(nn.Module):
    """Several checkpoints voting: the mean of their probabilities, as one model's logits. It takes images as the
    first checkpoint's run prepared them; a model trained at another size or normalisation gets them converted to
    its own, and its logits are resized back."""

    def __init__(self, checkpoints: list[dict]) -> None:
        super().__init__()
        self.members = nn.ModuleList(ckpt.model_from_checkpoint(checkpoint) for checkpoint in checkpoints)
        self.inputs = [(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"]) for checkpoint in checkpoints]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size, mean, std = self.inputs[0]
        logits = []
        for member, (member_size, member_mean, member_std) in zip(self.members, self.inputs, strict=True):
            member_images = images
            if (member_size, member_mean, member_std) != (size, mean, std):
                pixels = denormalize(images, mean, std)
                pixels = F.interpolate(pixels, size=(member_size, member_size), mode="bilinear", antialias=True)
                member_images = normalize(pixels, member_mean, member_std)
            logits.append(resize_logits(member(member_images).float(), images.shape[-2:]))
        return mean_probability_logit(logits)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (N, 1, h, w) resized bilinearly to size (H, W), e.g. back to a photo's own size; threshold after."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def mask_at_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bool mask (H, W) of one image's logits (1, h, w) resized to its own size (H, W)."""
    return logits_to_mask(resize_logits(logits[None], tuple(size)))[0, 0]


@contextlib.contextmanager
def out_of_memory_advice(batch_size: int) -> Iterator[None]:
    """The GPU running out of memory while predicting becomes one line saying which -b to try."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        smaller = f"a smaller -b (e.g. -b {batch_size // 2}) or " if batch_size > 1 else ""
        raise PetsegError(
            f"the GPU ran out of memory predicting with -b {batch_size}. Try {smaller}--device cpu, or close "
            "other programs using the GPU."
        ) from error


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False, loss_fn: nn.Module | None = None,
    desc: str = "eval", tta: bool = False,
) -> EvalResult:
    """Run the model over a loader of (image, mask) batches, or of (image, mask, original masks)
    ones (eval_loader(original_masks=True)) to also score each image at its own size.
    The loss is NaN when no loss_fn is given."""
    model.eval()
    # Kept on the device and read once at the end: a read per batch would make the host wait for the GPU.
    loss_sum = torch.zeros((), device=device)
    counts = torch.zeros(4, dtype=torch.int64, device=device)  # pixel_counts at the model's size, summed
    dices, original_counts, original_sizes, image_size = [], [], [], None
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images, masks = (tensor.to(device, non_blocking=non_blocking(device)) for tensor in batch[:2])
        logits = predict_logits(model, images, amp, tta)
        image_size = tuple(images.shape[-2:])
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks) * len(images)
        pred, gt = logits_to_mask(logits), masks.bool()
        dices.append(per_image_dice(pred, gt))
        counts += pixel_counts(pred, gt)
        for logit, original in zip(logits, batch[2] if len(batch) == 3 else [], strict=False):
            truth = original[0].to(device).bool()
            original_counts.append(pixel_counts(mask_at_size(logit, truth.shape), truth))
            original_sizes.append(tuple(truth.shape))
    floats, ints = read_once(torch.cat([*dices, loss_sum[None]]), torch.cat([counts, *original_counts]))
    return pooled_result(floats, ints, original_sizes, image_size, loss_fn is not None, tta)


def pooled_result(
    floats: list[float], ints: list[int], original_sizes: list[tuple[int, int]], image_size: tuple[int, int] | None,
    has_loss: bool, tta: bool,
) -> EvalResult:
    """The EvalResult of all processes' scores (read_once's lists: per-image Dice then the loss sum; the model-size
    pixel counts then each image's at its own size). Under torchrun each process scored its own share of the
    images: they are pooled, each image once. A process may hold no image; it still joins every gathering."""
    per_image = distributed.concat_across(floats[:-1])
    image_counts = [PooledPixels(*ints[4 + 4 * i: 8 + 4 * i]) for i in range(len(original_sizes))]
    originals = distributed.concat_across([
        OriginalSizeScore(*size, pet_pixels=pixels.truth, predicted_pixels=pixels.predicted, dice=pixels.dice)
        for pixels, size in zip(image_counts, original_sizes, strict=True)
    ])
    image_size = next(size for size in distributed.concat_across([image_size]) if size is not None)
    loss_sum, *sums = distributed.sum_across([floats[-1], *ints[:4], *(sum(ints[4 + k::4]) for k in range(4))])
    pooled, pooled_original = PooledPixels(*map(round, sums[:4])), PooledPixels(*map(round, sums[4:]))
    return EvalResult(
        loss=loss_sum / len(per_image) if has_loss else float("nan"),
        dice=statistics.fmean(per_image),
        dataset_dice=pooled.dice,
        dataset_iou=pooled.iou,
        per_image_dice=per_image,
        image_size=image_size,
        tta=tta,
        dice_original=sum(score.dice for score in originals) / len(originals) if originals else None,
        dataset_dice_original=pooled_original.dice if originals else None,
        dataset_iou_original=pooled_original.iou if originals else None,
        per_image_original=originals or None,
    )


class SplitWithOriginalMasks(OxfordPetSegmentation):
    """Items (image, mask, original mask): the third is the mask at its image's own size, untouched."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, original_mask = self.load_pair(index)
        image, mask = self.transform(image, original_mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), original_mask.as_subclass(torch.Tensor)


def collate_with_original_masks(
    batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Stack the model-size images and masks; keep the original masks, each of its own size, as a list."""
    images, masks, original_masks = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(masks), list(original_masks)


def default_num_workers() -> int:
    """One loader process per CPU core, at most 8, shared among the processes torchrun starts on a machine."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 1) // processes_here))


def eval_loader(
    data_path: Path, split: str, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
    num_workers: int, device: torch.device, skip_bad: bool = False, original_masks: bool = False,
    shard: Callable[[int], range] | None = None,
) -> DataLoader:
    """A split resized and normalised for evaluation, in file order; with original_masks, batches
    also carry each mask at its image's own size (a list), for scoring at the original resolution.
    `shard` (distributed.Processes.shard) picks this process's share of the images."""
    transform = build_transform(False, image_size, tuple(mean), tuple(std))
    split_class = SplitWithOriginalMasks if original_masks else OxfordPetSegmentation
    dataset = split_class(data_path, split, transform, skip_bad=skip_bad)
    return ordered_loader(
        dataset if shard is None else Subset(dataset, shard(len(dataset))), batch_size, num_workers, device,
        collate_with_original_masks if original_masks else None,
    )


def ordered_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, collate_fn: Callable | None = None
) -> DataLoader:
    """Every item of `dataset` once, in order, as evaluation reads a split (the cached path: batches.EvalBatches).
    Its own generator: evaluating must not draw from the global RNG."""
    return DataLoader(
        dataset, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda", collate_fn=collate_fn,
        generator=torch.Generator(),
    )


def format_result(split: str, result: EvalResult) -> str:
    """The lines train.py and inference.py both print, so their numbers can be compared by eye."""
    name = split.capitalize()
    size = result.size_label
    tta = ", horizontal-flip TTA" if result.tta else ""
    lines = [
        f"{name} Dice: {result.dice:.4f}  "
        f"(mean of per-image Dice at {size}, the model's input size: the lab's definition{tta})",
        f"{name} dataset-wide Dice: {result.dataset_dice:.4f}  IoU: {result.dataset_iou:.4f}  "
        f"(pixels pooled, at {size})",
    ]
    if result.dice_original is not None:
        lines.append(
            f"{name} Dice at original size: {result.dice_original:.4f}  dataset-wide: "
            f"{result.dataset_dice_original:.4f}  IoU: {result.dataset_iou_original:.4f}  "
            "(logits resized to each image's own size)"
        )
    return "\n".join(lines)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by evaluate.py and inference.py."""
    parser.add_argument(
        "-m", "--model", type=Path, nargs="+", action="extend", required=True,
        help="checkpoint .pt file written by train.py, or its run folder (then its best.pt); several (-m A B, or "
        "-m A -m B) vote with the mean of their probabilities",
    )
    parser.add_argument(
        "--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH,
        help="dataset folder holding images/ and annotations/ (never downloaded here: train.py downloads it)",
    )
    parser.add_argument(
        "-n", "--network", default=None,
        help="optional check: stop unless the checkpoint holds this network (it is read from the checkpoint anyway)",
    )
    parser.add_argument(
        "-b", "--batch_size", "--batch-size", type=positive(int), default=32,
        help="images per batch; lower it if memory runs out",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto picks cuda, then mps, then cpu"
    )
    parser.add_argument(
        "--num-workers", "--num_workers", type=non_negative, default=default_num_workers(),
        help="processes that read images; 0 reads them in the main process (default: one per CPU core, at most 8)",
    )
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="mixed precision on or off (default: on when the checkpoint's run used it and the GPU has tensor "
        "cores, compute capability 7.0 and newer)",
    )
    parser.add_argument(
        "--tta", action="store_true",
        help="test-time augmentation: average the probabilities of each image and its mirror image",
    )


@dataclass
class Predictor:
    """What predicts: one checkpoint's model, or an Ensemble of several; inputs are prepared as the
    first checkpoint's run prepared them."""

    model: nn.Module
    checkpoints: list[dict]
    paths: list[Path]
    device: torch.device
    amp: bool

    @property
    def first(self) -> dict:
        return self.checkpoints[0]

    def describe(self) -> str:
        """Which checkpoints predict, for the first line a script prints."""
        lines = [
            f"{display_path(path)}: {checkpoint['network']} from epoch {checkpoint['epoch']} "
            f"(valid Dice {checkpoint['valid_dice']:.4f}, {checkpoint['image_size']}px)"
            for path, checkpoint in zip(self.paths, self.checkpoints, strict=True)
        ]
        if len(lines) == 1:
            return lines[0]
        votes = "\n".join(f"  {line}" for line in lines)
        return f"ensemble of {len(lines)} checkpoints, voting with the mean of their probabilities:\n{votes}"


def load_for_eval(args: argparse.Namespace) -> Predictor:
    """The checkpoints of -m, their model (an Ensemble for several) on the device, and the precision."""
    paths = [ckpt.resolve_checkpoint_path(path) for path in args.model]
    checkpoints = [ckpt.load_checkpoint(path) for path in paths]
    for path, checkpoint in zip(paths, checkpoints, strict=True):
        if args.network is not None and args.network != checkpoint["network"]:
            raise ckpt.CheckpointError(
                f"-n/--network {args.network} was given, but {path} holds a {checkpoint['network']} model. "
                f"Drop -n, or pass -n {checkpoint['network']}."
            )
    device = select_device(args.device, purpose="prediction")
    model = ckpt.model_from_checkpoint(checkpoints[0]) if len(checkpoints) == 1 else Ensemble(checkpoints).eval()
    used_amp = all(checkpoint.get("amp", False) for checkpoint in checkpoints)
    amp = args.amp if args.amp is not None else used_amp and default_amp(device)
    return Predictor(model.to(device), checkpoints, paths, device, amp)


def score_split(args: argparse.Namespace, predictor: Predictor, split: str) -> tuple[OxfordPetSegmentation, EvalResult]:
    """The split prepared as the first checkpoint's run prepared it, scored at both sizes and printed (as train.py
    prints its scores); the dataset, with its names, and the result."""
    # Only train.py downloads: a mistyped --data_path here is an error, not an 800 MB download into the typo.
    data_path = prepare_dataset(args.data_path, download=False)
    first = predictor.first
    loader = eval_loader(
        data_path, split, first["image_size"], first["mean"], first["std"], args.batch_size, args.num_workers,
        predictor.device, original_masks=True,
    )
    result = evaluate(predictor.model, loader, predictor.device, amp=predictor.amp, desc=split, tta=args.tta)
    print(predictor.describe())
    print(f"{split} set: {len(loader.dataset)} images")
    print(format_result(split, result))
    return loader.dataset, result


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("Evaluate a petseg checkpoint, or several voting, on one split of Oxford-IIIT Pet.")
    add_eval_args(parser)
    parser.add_argument("--split", default="test", choices=SPLITS, help="which split to score")
    args = parser.parse_args(argv)
    predictor = load_for_eval(args)
    with out_of_memory_advice(args.batch_size):
        score_split(args, predictor, args.split)


if __name__ == "__main__":
    run_script(main)
