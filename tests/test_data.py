"""Data: splits, masks, decoding of odd image modes, transforms keeping image and mask aligned."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

import oxford_pet
from augment import crop_source_size
from errors import display_path
from make_synthetic_pets import QUIRK_MODES, image_modes
from oxford_pet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    OxfordPetSegmentation,
    load_dataset,
    prepare_dataset,
    read_image,
    split_names,
    trimap_to_mask,
)


def test_official_split_files_give_the_labs_split_sizes(real_sample: Path, tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    shutil.copy(real_sample / "annotations" / "trainval_full.txt", annotations / "trainval.txt")
    shutil.copy(real_sample / "annotations" / "test_full.txt", annotations / "test.txt")
    sizes = {split: len(split_names(tmp_path, split)) for split in ("train", "valid", "test")}
    assert sizes == {"train": 3312, "valid": 368, "test": 3669}


def test_split_rule_every_tenth_trainval_line_is_valid(synthetic_pets: Path) -> None:
    lines = (synthetic_pets / "annotations" / "trainval.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert split_names(synthetic_pets, "valid") == names[0::10]
    assert split_names(synthetic_pets, "train") == [n for i, n in enumerate(names) if i % 10]
    test_names = [line.split()[0] for line in (synthetic_pets / "annotations" / "test.txt").read_text().splitlines()]
    assert split_names(synthetic_pets, "test") == test_names


def test_trimap_values_map_border_to_pet() -> None:
    trimap = torch.tensor([[1, 2, 3], [2, 3, 1]], dtype=torch.uint8)
    assert trimap_to_mask(trimap).tolist() == [[1, 0, 1], [0, 1, 1]]


def test_untransformed_mask_is_pet_or_border_of_the_trimap(synthetic_pets: Path) -> None:
    dataset = OxfordPetSegmentation(synthetic_pets, "train")
    for index in range(3):
        image, mask = dataset.load_pair(index)
        name = dataset.names[index]
        trimap = np.asarray(Image.open(synthetic_pets / "annotations" / "trimaps" / f"{name}.png"))
        assert mask.shape == (1, *trimap.shape) and image.shape == (3, *trimap.shape)
        assert (trimap == 3).any(), "the fixture should have border pixels"
        assert np.array_equal(mask[0].numpy(), np.isin(trimap, (1, 3)).astype(np.uint8))


def test_gray_rgba_cmyk_and_palette_images_load_as_rgb(synthetic_pets: Path) -> None:
    modes = image_modes(synthetic_pets)
    assert set(QUIRK_MODES) <= set(modes.values())
    for name, mode in modes.items():
        path = synthetic_pets / "images" / f"{name}.jpg"
        image = read_image(path)
        with Image.open(path) as original:
            assert image.shape == (3, original.height, original.width) and image.dtype == torch.uint8, name
            if mode == "L":
                gray = torch.from_numpy(np.array(original))
                assert all(torch.equal(channel, gray) for channel in image), "gray must fill all three channels"
            if mode == "RGBA":
                rgb = torch.from_numpy(np.asarray(original)[..., :3].copy()).permute(2, 0, 1)
                assert torch.equal(image, rgb), "RGBA keeps its colour channels and drops alpha"


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_items_have_model_ready_shapes_and_binary_masks(synthetic_pets: Path, split: str) -> None:
    dataset = load_dataset(synthetic_pets, split, image_size=64)
    assert len(dataset) == {"valid": 6, "test": 20}[split]
    for index in range(len(dataset)):
        image, mask = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert type(image) is torch.Tensor and type(mask) is torch.Tensor


def test_train_items_are_uint8_at_the_crop_source_size_as_the_cache_stores_them(synthetic_pets: Path) -> None:
    dataset = load_dataset(synthetic_pets, "train", image_size=64)
    assert len(dataset) == 54
    source = crop_source_size(64)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        assert image.shape == (3, source, source) and image.dtype == torch.uint8
        assert mask.shape == (1, source, source) and mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1}
        assert type(image) is torch.Tensor and type(mask) is torch.Tensor


def test_eval_transform_is_deterministic_and_normalised(synthetic_pets: Path) -> None:
    dataset = load_dataset(synthetic_pets, "valid", image_size=48)
    first, second = dataset[0], dataset[0]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].min() < 0 < first[0].max()


def _asymmetric_pair(size: int = 120) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """An L-shaped red pet on blue: any flip, crop or rotation applied to one and not the other shows."""
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[10:90, 15:40] = 1
    mask[65:90, 15:100] = 1
    image = torch.empty(3, size, size, dtype=torch.uint8)
    image[0] = torch.where(mask.bool(), 220, 30)
    image[1] = 60
    image[2] = torch.where(mask.bool(), 30, 220)
    return tv_tensors.Image(image), tv_tensors.Mask(mask[None])


def _agreement_away_from_edges(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of pixels, away from the pet's outline, where 'red' in the image matches the mask."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = image * std + mean
    looks_like_pet = rgb[0] > rgb[2] + 0.05
    # Bilinear image vs nearest mask may differ by a pixel along the outline; judge the rest.
    dilated = torch.nn.functional.max_pool2d(mask[None], 5, 1, 2)[0, 0]
    eroded = -torch.nn.functional.max_pool2d(-mask[None], 5, 1, 2)[0, 0]
    interior = dilated == eroded
    return (looks_like_pet == mask[0].bool())[interior].float().mean().item()


def _remove_one_trimap(data_path: Path) -> Path:
    trimap = next((data_path / "annotations" / "trimaps").glob("*.png"))
    trimap.unlink()
    return trimap


def test_incomplete_dataset_folder_is_refused_with_the_missing_file(synthetic_pets: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(synthetic_pets, tmp_path / "oxford-iiit-pet")
    removed = _remove_one_trimap(broken)
    with pytest.raises(DatasetError, match=removed.name):
        prepare_dataset(broken)


def test_complete_dataset_is_accepted_without_download(synthetic_pets: Path) -> None:
    assert prepare_dataset(synthetic_pets, download=False) == synthetic_pets.resolve()


def test_failed_download_explains_manual_setup_and_leaves_nothing_half_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(root: Path, **kwargs) -> None:
        (Path(root) / "oxford-iiit-pet" / "images").mkdir(parents=True)  # a download cut off half-way
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(oxford_pet.datasets, "OxfordIIITPet", offline)
    target = tmp_path / "dataset" / "oxford-iiit-pet"
    with pytest.raises(DatasetError) as error:
        prepare_dataset(target)
    message = str(error.value)
    # The folder as display_path shows it: relative when that is shorter (a clone under /tmp, say), else absolute.
    for needed in ("images.tar.gz", "annotations.tar.gz", display_path(target.resolve()), "robots.ox.ac.uk"):
        assert needed in message
    assert not target.exists(), "a failed download must not leave a folder that looks like the dataset"


def test_no_download_flag_explains_manual_setup(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images.tar.gz"):
        prepare_dataset(tmp_path / "oxford-iiit-pet", download=False)


def test_real_sample_every_pair_loads(real_sample: Path) -> None:
    total = 0
    for split in ("train", "valid", "test"):
        dataset = OxfordPetSegmentation(real_sample, split)
        for index in range(len(dataset)):
            image, mask = dataset.load_pair(index)
            assert image.shape[0] == 3 and image.shape[1:] == mask.shape[1:], dataset.names[index]
            assert mask.any(), f"{dataset.names[index]} has no pet pixel"
        total += len(dataset)
    assert total == 581
    assert read_image(real_sample / "images" / "Abyssinian_5.jpg").shape == (3, 150, 200)  # RGBA PNG named .jpg
