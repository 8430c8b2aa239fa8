from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from make_synthetic_pets import QUIRK_MODES, image_modes, main, make_synthetic_pets

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_pets(tmp_path_factory.mktemp("pets") / "data")


def split_lines(root: Path, split: str) -> list[list[str]]:
    return [line.split() for line in (root / "annotations" / f"{split}.txt").read_text().splitlines()]


def all_names(root: Path) -> list[str]:
    return [fields[0] for split in ("trainval", "test") for fields in split_lines(root, split)]


def trimap(root: Path, name: str) -> np.ndarray:
    with Image.open(root / "annotations" / "trimaps" / f"{name}.png") as image:
        assert image.mode == "L"
        return np.array(image)


def test_layout_and_split_files(root: Path) -> None:
    trainval, test = split_lines(root, "trainval"), split_lines(root, "test")
    assert (len(trainval), len(test)) == (40, 20)
    names = all_names(root)
    assert len(set(names)) == len(names)
    assert {p.name for p in root.iterdir()} == {"images", "annotations"}
    assert {p.name for p in (root / "annotations").iterdir()} == {"trimaps", "trainval.txt", "test.txt"}
    assert sorted(p.stem for p in (root / "images").iterdir()) == sorted(names)
    assert sorted(p.stem for p in (root / "annotations" / "trimaps").iterdir()) == sorted(names)
    assert trainval[0] == ["Abyssinian_1", "1", "1", "1"]
    for name, class_id, species, breed_id in trainval + test:
        assert name.rsplit("_", 1)[1].isdigit()
        assert 1 <= int(class_id) <= 37 and 1 <= int(breed_id) <= 25
        # Cats are Capitalised (species 1), dogs lowercase (species 2), as in the real data.
        assert species == ("1" if name[0].isupper() else "2")


def test_trimaps_match_images(root: Path) -> None:
    sizes = set()
    for name in all_names(root):
        with Image.open(root / "images" / f"{name}.jpg") as image:
            size = image.size
        t = trimap(root, name)
        assert t.shape == (size[1], size[0])
        assert set(np.unique(t)) == {1, 2, 3}
        assert 0.1 < np.isin(t, (1, 3)).mean() < 0.6
        sizes.add(size)
    assert len(sizes) > 1
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_quirk_images_head_each_split(root: Path) -> None:
    modes = image_modes(root)
    for split in ("trainval", "test"):
        names = [fields[0] for fields in split_lines(root, split)]
        assert tuple(modes[n] for n in names[: len(QUIRK_MODES)]) == QUIRK_MODES
        assert all(modes[n] == "RGB" for n in names[len(QUIRK_MODES):])
        for name in names[: len(QUIRK_MODES)]:
            is_png = (root / "images" / f"{name}.jpg").read_bytes().startswith(PNG_SIGNATURE)
            assert is_png == (modes[name] in ("RGBA", "P"))
    assert {"L", "RGBA", "CMYK"} <= set(modes.values())


def test_no_quirks_gives_only_rgb(tmp_path: Path) -> None:
    root = make_synthetic_pets(tmp_path, n_trainval=5, n_test=2, quirks=False)
    assert set(image_modes(root).values()) == {"RGB"}


def test_deterministic_for_a_seed(root: Path, tmp_path: Path) -> None:
    same = make_synthetic_pets(tmp_path / "same", n_trainval=6, n_test=3)
    other = make_synthetic_pets(tmp_path / "other", n_trainval=6, n_test=3, seed=1)
    name = all_names(same)[5]
    trimap_path = Path("annotations", "trimaps", f"{name}.png")
    image_path = Path("images", f"{name}.jpg")
    for path in (trimap_path, image_path):
        assert (same / path).read_bytes() == (root / path).read_bytes()
    assert (other / trimap_path).read_bytes() != (root / trimap_path).read_bytes()


def test_image_size_sets_the_scale(tmp_path: Path) -> None:
    root = make_synthetic_pets(tmp_path, n_trainval=3, n_test=0, image_size=(400, 300), quirks=False)
    for path in (root / "images").iterdir():
        with Image.open(path) as image:
            assert 165 <= min(image.size) <= 300 and 280 <= max(image.size) <= 400


def test_pet_colour_differs_from_background(root: Path) -> None:
    modes = image_modes(root)
    for name in all_names(root):
        if modes[name] != "RGB":
            continue
        with Image.open(root / "images" / f"{name}.jpg") as image:
            rgb = np.asarray(image, dtype=np.float32)
        t = trimap(root, name)
        pet, background = rgb[t == 1].mean(axis=0), rgb[t == 2].mean(axis=0)
        assert np.linalg.norm(pet - background) > 60
        # Warm pet, cool background: a per-image rule a small net learns quickly.
        assert pet[0] > pet[1] and background[1] > background[0]


def test_cli_writes_and_refuses_non_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main([str(out), "--n-trainval", "3", "--n-test", "2", "--seed", "3"])
    assert len(split_lines(out, "trainval")) == 3 and len(split_lines(out, "test")) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(out)])
    assert exit_info.value.code == 2
    assert str(out) in capsys.readouterr().err
