"""The decode-once cache and the batched augmentation: same tensors, same recipe, rebuilt when stale."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

import augment
import batches
import train
from augment import AUGMENTATIONS, DEFAULT_AUGMENTATION, crop_source_size
from batches import EvalBatches
from cache import load_or_build
from conftest import augment_batch
from distributed import Processes
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD, OxfordPetSegmentation, load_dataset
from test_data import _agreement_away_from_edges, _asymmetric_pair

CPU = torch.device("cpu")
DEFAULT_CROP = next(op for op in DEFAULT_AUGMENTATION.ops if isinstance(op, augment.RandomResizedCrop))
CROP_SCALE, CROP_RATIO = DEFAULT_CROP.scale, DEFAULT_CROP.ratio


@pytest.mark.parametrize("split", ["valid", "test"])
def test_cached_and_uncached_evaluation_tensors_are_identical(synthetic_pets: Path, tmp_path: Path, split: str) -> None:
    dataset = load_dataset(synthetic_pets, split, image_size=64)
    uncached = list(DataLoader(dataset, batch_size=7))
    cached = list(EvalBatches(load_or_build(dataset, 64, tmp_path), 7, CPU, IMAGENET_MEAN, IMAGENET_STD))
    assert len(cached) == len(uncached)
    for (image_a, mask_a), (image_b, mask_b) in zip(uncached, cached, strict=True):
        assert torch.equal(image_a, image_b)
        assert torch.equal(mask_a, mask_b)


def cache_files(cache_dir: Path) -> set[str]:
    return {path.name for path in cache_dir.iterdir()}


def test_cache_is_reused_then_rebuilt_when_size_or_sources_change(synthetic_pets: Path, tmp_path: Path) -> None:
    data = shutil.copytree(synthetic_pets, tmp_path / "pets")
    cache_dir = tmp_path / "cache"
    dataset = OxfordPetSegmentation(data, "valid")
    first = load_or_build(dataset, 48, cache_dir)
    files = cache_files(cache_dir)
    assert len(files) == 3 and first.images.shape == (len(dataset), 3, 48, 48)

    stamps = {name: (cache_dir / name).stat().st_mtime_ns for name in files}
    again = load_or_build(dataset, 48, cache_dir)
    assert {name: (cache_dir / name).stat().st_mtime_ns for name in files} == stamps, "an unchanged cache is reused"
    assert torch.equal(again.images, first.images) and again.names == first.names

    load_or_build(dataset, 40, cache_dir)
    assert len(cache_files(cache_dir)) == 6, "another size is another cache"

    trimap = data / "annotations" / "trimaps" / f"{dataset.names[1]}.png"
    os.utime(trimap, ns=(trimap.stat().st_atime_ns, trimap.stat().st_mtime_ns + 10**9))
    rebuilt = load_or_build(dataset, 48, cache_dir)
    assert len(cache_files(cache_dir)) == 6, "the stale 48px cache is replaced, not kept beside the new one"
    assert not files & cache_files(cache_dir)
    assert torch.equal(rebuilt.masks, first.masks)


def test_a_half_written_cache_is_not_used(synthetic_pets: Path, tmp_path: Path) -> None:
    dataset = OxfordPetSegmentation(synthetic_pets, "valid")
    load_or_build(dataset, 32, tmp_path)
    names_file = next(tmp_path.glob("*.names.json"))
    names_file.unlink()  # as if the build had been killed before its last file
    rebuilt = load_or_build(dataset, 32, tmp_path)
    assert json.loads(names_file.read_text())["names"] == rebuilt.names == dataset.names


def test_batched_augmentation_moves_images_and_masks_together() -> None:
    image, mask = _asymmetric_pair(size=91)
    images = image[None].repeat(16, 1, 1, 1).as_subclass(torch.Tensor)
    masks = mask[None].repeat(16, 1, 1, 1).as_subclass(torch.Tensor)
    out_images, out_masks = augment_batch(
        images, masks, 64, IMAGENET_MEAN, IMAGENET_STD, torch.Generator().manual_seed(0)
    )
    assert out_images.shape == (16, 3, 64, 64) and out_masks.shape == (16, 1, 64, 64)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}, "masks must stay exact"
    for out_image, out_mask in zip(out_images, out_masks, strict=True):
        assert _agreement_away_from_edges(out_image, out_mask) > 0.995
        assert _agreement_away_from_edges(out_image, out_mask.flip(-1)) < 0.9
    assert len({out_mask.sum().item() for out_mask in out_masks}) > 8, "every image gets its own crop"


def test_batched_augmentation_is_reproducible_from_its_generator() -> None:
    image, mask = _asymmetric_pair(size=91)
    images, masks = image[None].repeat(4, 1, 1, 1), mask[None].repeat(4, 1, 1, 1)
    run = [
        augment_batch(images, masks, 64, IMAGENET_MEAN, IMAGENET_STD, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(run[0][0], run[1][0]) and torch.equal(run[0][1], run[1][1])


def test_a_preset_resamples_once_and_keeps_its_geometry_together() -> None:
    with pytest.raises(ValueError, match="stand together"):
        augment.Augmentation([augment.Rotation(10), augment.ColorJitter(0.3), augment.HorizontalFlip()])
    image, mask = _asymmetric_pair(size=91)
    images = image[None].repeat(4, 1, 1, 1).as_subclass(torch.Tensor)
    masks = mask[None].repeat(4, 1, 1, 1).as_subclass(torch.Tensor)
    colour_only = augment.Augmentation([augment.ColorJitter(0.3)])  # its one resampling is a plain resize
    out_images, out_masks = augment_batch(
        images, masks, 64, IMAGENET_MEAN, IMAGENET_STD, torch.Generator().manual_seed(0), colour_only
    )
    assert out_images.shape == (4, 3, 64, 64) and set(out_masks.unique().tolist()) <= {0.0, 1.0}
    for out_image, out_mask in zip(out_images, out_masks, strict=True):
        assert _agreement_away_from_edges(out_image, out_mask) > 0.995
        assert torch.equal(out_mask, out_masks[0]), "no geometry: every mask is the same resize"


def test_batched_crops_follow_random_resized_crop_ranges() -> None:
    crop = DEFAULT_CROP.sample(20_000, torch.Generator().manual_seed(0))
    cx, cy, width, height = crop["cx"], crop["cy"], crop["width"], crop["height"]
    area, ratio = width * height, width / height
    assert area.min() >= CROP_SCALE[0] - 1e-6 and area.max() <= CROP_SCALE[1] + 1e-6
    assert ratio.min() >= CROP_RATIO[0] - 1e-6 and ratio.max() <= CROP_RATIO[1] + 1e-6
    assert (cx - width / 2).min() >= 0 and (cx + width / 2).max() <= 1 + 1e-6
    assert (cy - height / 2).min() >= 0 and (cy + height / 2).max() <= 1 + 1e-6
    # The same distribution as torchvision's RandomResizedCrop, which the per-image path uses.
    torch.manual_seed(0)
    square = torch.zeros(1, 1000, 1000)
    reference = [RandomResizedCrop.get_params(square, CROP_SCALE, CROP_RATIO) for _ in range(20_000)]
    reference_area = torch.tensor([h * w / 1e6 for _, _, h, w in reference])
    reference_ratio = torch.tensor([w / h for _, _, h, w in reference])
    assert abs(area.mean() - reference_area.mean()) < 0.01
    assert abs(area.std() - reference_area.std()) < 0.01
    assert abs(ratio.log().mean() - reference_ratio.log().mean()) < 0.01


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_strength_draws_inside_its_ranges(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    kinds = set()
    for op in AUGMENTATIONS[name].ops:  # drawn one after the other from one generator, as the preset draws them
        params = op.sample(5000, generator)
        kinds.add(type(op))
        if isinstance(op, augment.RandomResizedCrop):
            area = params["width"] * params["height"]
            assert area.min() >= op.scale[0] - 1e-6 and area.max() <= op.scale[1] + 1e-6
        if isinstance(op, augment.Rotation):
            rotation = op.matrix(params)
            angles = torch.rad2deg(torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])).abs()
            assert angles.max() <= op.degrees + 1e-4
            if op.degrees:
                assert angles.max() > op.degrees * 0.9, "the range is used, not just bounded"
        if isinstance(op, augment.ColorJitter):
            for factor in (params["brightness"], params["contrast"], params["saturation"]):
                assert (factor - 1).abs().max() <= op.strength + 1e-6
    assert kinds == {augment.RandomResizedCrop, augment.HorizontalFlip, augment.Rotation, augment.ColorJitter}


def test_the_augment_flag_reaches_the_cache_and_the_batches(synthetic_pets: Path, tmp_path: Path) -> None:
    args = train.build_parser().parse_args([
        "--data_path", str(synthetic_pets), "-b", "8", "--image-size", "32", "--num-workers", "0",
        "--augment", "light", "--cache-dir", str(tmp_path),
    ])
    train_loader, _, _ = batches.make_loaders(args, synthetic_pets, CPU, Processes(), 8)
    light_source = crop_source_size(32, AUGMENTATIONS["light"])
    assert light_source < crop_source_size(32)
    assert any(f"-train-{light_source}-" in path.name for path in tmp_path.iterdir())
    assert train_loader.augmentation == AUGMENTATIONS["light"]
    images, _ = next(iter(train_loader))
    assert images.shape == (8, 3, 32, 32)
