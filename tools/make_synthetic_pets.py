"""Write a small synthetic dataset in the official Oxford-IIIT Pet layout.

    ROOT/images/NAME.jpg
    ROOT/annotations/trimaps/NAME.png   mode "L", same size: 1 = pet, 2 = background, 3 = border
    ROOT/annotations/trainval.txt       lines "NAME CLASS_ID SPECIES BREED_ID"
    ROOT/annotations/test.txt

Each pet is a warm-coloured striped or spotted blob (a union of 1-3 ellipses covering 15-50 %
of the image) on a smooth, cool-coloured, slightly noisy background: easy enough for a
segmentation net to learn in a few epochs, yet colours, shapes and sizes vary per image.

With quirks on, the first len(QUIRK_MODES) entries of trainval.txt and of test.txt (fewer when a
split is shorter) are images whose PIL modes are QUIRK_MODES, in that order; trainval line 0
falls in the valid subset under "i % 10 == 0 -> valid", lines 1-3 in train. As in the real
data, the "RGBA" and "P" ones are PNG files under a .jpg name. Every other image is an RGB JPEG.
No other files are written.

CLI: python tools/make_synthetic_pets.py OUT_DIR [--n-trainval N] [--n-test N] [--real-sizes]
                                         [--seed S] [--no-quirks]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli import argument_parser  # noqa: E402

# The official 37 breeds in class-id order: (name, species, breed id within species).
# Cats (species 1) are Capitalised, dogs (species 2) lowercase, as in the real file names.
BREEDS: tuple[tuple[str, int, int], ...] = (
    ("Abyssinian", 1, 1),
    ("american_bulldog", 2, 1),
    ("american_pit_bull_terrier", 2, 2),
    ("basset_hound", 2, 3),
    ("beagle", 2, 4),
    ("Bengal", 1, 2),
    ("Birman", 1, 3),
    ("Bombay", 1, 4),
    ("boxer", 2, 5),
    ("British_Shorthair", 1, 5),
    ("chihuahua", 2, 6),
    ("Egyptian_Mau", 1, 6),
    ("english_cocker_spaniel", 2, 7),
    ("english_setter", 2, 8),
    ("german_shorthaired", 2, 9),
    ("great_pyrenees", 2, 10),
    ("havanese", 2, 11),
    ("japanese_chin", 2, 12),
    ("keeshond", 2, 13),
    ("leonberger", 2, 14),
    ("Maine_Coon", 1, 7),
    ("miniature_pinscher", 2, 15),
    ("newfoundland", 2, 16),
    ("Persian", 1, 8),
    ("pomeranian", 2, 17),
    ("pug", 2, 18),
    ("Ragdoll", 1, 9),
    ("Russian_Blue", 1, 10),
    ("saint_bernard", 2, 19),
    ("samoyed", 2, 20),
    ("scottish_terrier", 2, 21),
    ("shiba_inu", 2, 22),
    ("Siamese", 1, 11),
    ("Sphynx", 1, 12),
    ("staffordshire_bull_terrier", 2, 23),
    ("wheaten_terrier", 2, 24),
    ("yorkshire_terrier", 2, 25),
)

# PIL modes of the quirky images at the head of each split file, in order.
QUIRK_MODES: tuple[str, ...] = ("L", "RGBA", "CMYK", "P")

# Nominal (width, height): small keeps tests fast, real matches the typical Oxford-IIIT photo.
SMALL_IMAGE_SIZE: tuple[int, int] = (240, 200)
REAL_IMAGE_SIZE: tuple[int, int] = (500, 375)

TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
# The border band reaches this many pixels into the pet and as many out of it.
BORDER_HALF_WIDTH = 2

_PNG_MODES = ("RGBA", "P")
_JPEG_QUALITY = 90
_MIN_SIDE = 32


def _image_size(rng: np.random.Generator, nominal: tuple[int, int], flip: bool) -> tuple[int, int]:
    """Draw a (width, height) around `nominal`, in the other orientation when `flip`."""
    long_side, short_side = max(nominal), min(nominal)
    long_px = round(long_side * rng.uniform(0.7, 1.0))
    short_px = round(long_px * short_side / long_side * rng.uniform(0.8, 1.0))
    landscape = (nominal[0] >= nominal[1]) != flip
    return (long_px, short_px) if landscape else (short_px, long_px)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
             angle: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    cos, sin = math.cos(angle), math.sin(angle)
    return ((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2 <= 1.0


def _blob(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A body ellipse plus 0-2 smaller attached ones, redrawn until it covers 15-50 % of the image."""
    w, h = x.shape[1], y.shape[0]
    while True:
        aspect = rng.uniform(0.55, 1.0)
        a = math.sqrt(rng.uniform(0.12, 0.35) * w * h / (math.pi * aspect))
        b = a * aspect
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        angle = rng.uniform(0.0, math.pi)
        mask = _ellipse(x, y, cx, cy, a, b, angle)
        for _ in range(rng.integers(0, 3)):
            # Centred on the body's outline so that the union stays one connected pet.
            t = rng.uniform(0.0, 2 * math.pi)
            px, py = a * math.cos(t), b * math.sin(t)
            ex = cx + px * math.cos(angle) - py * math.sin(angle)
            ey = cy + px * math.sin(angle) + py * math.cos(angle)
            ea = a * rng.uniform(0.3, 0.55)
            mask |= _ellipse(x, y, ex, ey, ea, ea * rng.uniform(0.6, 1.0), rng.uniform(0.0, math.pi))
        if 0.15 <= mask.mean() <= 0.5:
            return mask


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2 * radius + 1)^2 square, done separably."""
    rows = mask.copy()
    for s in range(1, radius + 1):
        rows[s:] |= mask[:-s]
        rows[:-s] |= mask[s:]
    out = rows.copy()
    for s in range(1, radius + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out


def _trimap(mask: np.ndarray) -> np.ndarray:
    trimap = np.where(mask, TRIMAP_PET, TRIMAP_BACKGROUND).astype(np.uint8)
    # Pixels near both pet and background: the boundary band, on both sides of the outline.
    trimap[_dilate(mask, BORDER_HALF_WIDTH) & _dilate(~mask, BORDER_HALF_WIDTH)] = TRIMAP_BORDER
    return trimap


def _pet_texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Warm base colour darkened by stripes or spots, whose scale follows the image size."""
    red = rng.uniform(170, 240)
    base = np.array([red, red * rng.uniform(0.45, 0.7), red * rng.uniform(0.1, 0.35)], np.float32)
    period = min(x.shape[1], y.shape[0]) * rng.uniform(0.06, 0.12)
    angle = rng.uniform(0.0, math.pi)
    u = (x * math.cos(angle) + y * math.sin(angle)) * (2 * math.pi / period)
    if rng.random() < 0.5:
        pattern = 0.5 + 0.5 * np.sin(u)
    else:
        v = (y * math.cos(angle) - x * math.sin(angle)) * (2 * math.pi / period)
        pattern = np.clip(2.0 * np.sin(u) * np.sin(v), 0.0, 1.0)
    shade = 1.0 - rng.uniform(0.3, 0.5) * pattern
    return shade[..., None] * base


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Low-frequency blend of two greenish/bluish colours."""
    w, h = x.shape[1], y.shape[0]
    low = np.array([30, 100, 90], np.float32)
    high = np.array([110, 190, 200], np.float32)
    c0 = rng.uniform(low, high).astype(np.float32)
    c1 = rng.uniform(low, high).astype(np.float32)
    angle = rng.uniform(0.0, 2 * math.pi)
    ramp = (x / w - 0.5) * math.cos(angle) + (y / h - 0.5) * math.sin(angle) + 0.5
    wobble = np.sin(2 * math.pi * (x / w * rng.uniform(0.5, 1.5) + rng.random())) * np.sin(
        2 * math.pi * (y / h * rng.uniform(0.5, 1.5) + rng.random()))
    t = np.clip(ramp + 0.2 * wobble, 0.0, 1.0)
    return c0 + (c1 - c0) * t[..., None]


def _sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, trimap) pair of the given (width, height)."""
    w, h = size
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    mask = _blob(rng, x, y)
    image = np.where(mask[..., None], _pet_texture(rng, x, y), _background(rng, x, y))
    # Uniform rather than Gaussian noise: several times cheaper to draw, and looks the same.
    image += 20.0 * rng.random(image.shape, dtype=np.float32) - 10.0
    return np.clip(image, 0, 255).astype(np.uint8), _trimap(mask)


def _save_image(rgb: np.ndarray, path: Path, mode: str) -> None:
    image = Image.fromarray(rgb)
    if mode == "P":
        image = image.quantize()
    elif mode != "RGB":
        image = image.convert(mode)
    if mode in _PNG_MODES:
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def make_synthetic_pets(root: Path | str, n_trainval: int = 40, n_test: int = 20,
                        image_size: tuple[int, int] | None = None, seed: int = 0,
                        quirks: bool = True, *, progress: bool = False) -> Path:
    """Write the dataset into `root` (missing or empty) and return it as a Path.

    Sizes vary around `image_size` (width, height), SMALL_IMAGE_SIZE when None: the long side
    by 70-100 %, the aspect ratio by 80-100 %, and every third image is turned to the other
    orientation. Output depends only on the arguments. Raises FileExistsError when `root`
    exists and is not an empty folder.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"refusing to write into non-empty {root}")
    nominal = image_size or SMALL_IMAGE_SIZE
    if min(nominal) < _MIN_SIDE:
        raise ValueError(f"image_size {nominal} is too small: each side must be >= {_MIN_SIDE}")
    images_dir = root / "images"
    trimaps_dir = root / "annotations" / "trimaps"
    images_dir.mkdir(parents=True)
    trimaps_dir.mkdir(parents=True)

    with tqdm(total=n_trainval + n_test, unit="img", disable=not progress) as bar:
        count = 0  # across both splits, so that names are unique like the real ones
        for split_id, (split, n) in enumerate((("trainval", n_trainval), ("test", n_test))):
            lines = []
            for i in range(n):
                breed, species, breed_id = BREEDS[count % len(BREEDS)]
                name = f"{breed}_{count // len(BREEDS) + 1}"
                mode = QUIRK_MODES[i] if quirks and i < len(QUIRK_MODES) else "RGB"
                rng = np.random.default_rng([seed, split_id, i])
                rgb, trimap = _sample(rng, _image_size(rng, nominal, flip=i % 3 == 2))
                _save_image(rgb, images_dir / f"{name}.jpg", mode)
                Image.fromarray(trimap).save(trimaps_dir / f"{name}.png")
                lines.append(f"{name} {count % len(BREEDS) + 1} {species} {breed_id}\n")
                count += 1
                bar.update()
            (root / "annotations" / f"{split}.txt").write_text("".join(lines))
    return root


def image_modes(root: Path | str) -> dict[str, str]:
    """PIL mode of every image under root/images, keyed by name (file stem)."""
    modes = {}
    for path in sorted(Path(root, "images").glob("*.jpg")):
        with Image.open(path) as image:
            modes[path.stem] = image.mode
    return modes


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("Write a synthetic dataset in the Oxford-IIIT Pet layout, for tests and benchmarks.")
    parser.add_argument("out_dir", type=Path,
                        help="missing or empty folder to write into; pass it to the scripts as --data_path")
    parser.add_argument("--n-trainval", type=int, default=40,
                        help="images in annotations/trainval.txt (train.py keeps every tenth for valid)")
    parser.add_argument("--n-test", type=int, default=20, help="images in annotations/test.txt")
    parser.add_argument("--real-sizes", action="store_true",
                        help=f"sizes around {REAL_IMAGE_SIZE[0]}x{REAL_IMAGE_SIZE[1]} like the real "
                             f"data, instead of around {SMALL_IMAGE_SIZE[0]}x{SMALL_IMAGE_SIZE[1]}")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: the same seed and flags write the same files")
    parser.add_argument("--no-quirks", dest="quirks", action="store_false",
                        help="make every image an RGB JPEG, instead of starting each split with gray, RGBA, "
                             "CMYK and palette images as the real data has")
    args = parser.parse_args(argv)
    try:
        root = make_synthetic_pets(args.out_dir, args.n_trainval, args.n_test,
                                   REAL_IMAGE_SIZE if args.real_sizes else None, args.seed,
                                   args.quirks, progress=True)
    except FileExistsError as error:
        parser.error(str(error))
    print(f"wrote {args.n_trainval + args.n_test} images to {root}")


if __name__ == "__main__":
    main()
