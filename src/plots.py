"""Figures: learning curves, runs compared, test cases with their errors, and overlays of users' photos."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run on headless GPU machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import ImageColor  # noqa: E402
from torchvision.utils import draw_segmentation_masks  # noqa: E402

from errors import display_path
from files import atomic_write

# Cyan is no fur colour, so the tint shows on orange, brown, cream, white and black pets alike; the
# outline is two lines, dark outside and bright inside, so one of them stands out on any fur.
PREDICTION_COLOR = "#00e5ff"
OUTLINE_COLORS = ("#000000", PREDICTION_COLOR)
TINT_ALPHA = 0.4
MAX_COLUMNS = 6  # overlays per row of plot_cases; more would shrink them below readable
VALID_MARKER, TRAIN_MARKER, BEST_MARKER = "o", "s", "*"  # train's squares are drawn hollow
# Okabe-Ito colours: told apart with every common kind of colour blindness.
ERROR_COLORS = {
    "pet, found (true positive)": "#009E73",
    "background called pet (false positive)": "#E69F00",
    "pet missed (false negative)": "#CC79A7",
}


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        with atomic_write(Path(path)) as file:
            fig.savefig(file, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)  # pyplot keeps every open figure: one per epoch would add up, failed or not


# Text the user chose (run names, image names, titles holding them) is drawn as typed: matplotlib would read
# `$...$` in it as math, and fail to draw a name such as `lr$1e-3_$x^$` at all.
AS_TYPED = {"parse_math": False}


@dataclass
class Case:
    """One image of plot_cases: the photo and both masks at the same (H, W), and a caption."""

    image: torch.Tensor  # uint8 (3, H, W)
    truth: torch.Tensor  # bool (H, W)
    prediction: torch.Tensor  # bool (H, W)
    caption: str


def error_overlay(image: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """The photo (uint8 (3, H, W)) with true positives, false positives and false negatives in their colours."""
    regions = torch.stack([truth & prediction, ~truth & prediction, truth & ~prediction])
    return draw_segmentation_masks(image, regions, alpha=0.6, colors=list(ERROR_COLORS.values()))


def _and_shifted(target: torch.Tensor, source: torch.Tensor, offset: int, dim: int) -> None:
    """target[i] &= source[i + offset] along `dim`, in place; past the end, `source` counts as True."""
    kept = target.shape[dim] - offset
    if kept > 0:
        target.narrow(dim, 0, kept).logical_and_(source.narrow(dim, offset, kept))


def _runs_ahead(mask: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Whether mask[i : i + length] along `dim` is all True (the image's end counting as True), from
    about 2 log2(length) whole-image ANDs: a run of a + b is a run of a followed by one of b."""
    result, covered, block, span = None, 0, mask, 1
    while True:
        if length & 1:
            if result is None:
                result = block.clone()
            else:
                _and_shifted(result, block, covered, dim)
            covered += span
        length >>= 1
        if not length:
            return result
        doubled = block.clone()
        _and_shifted(doubled, block, span, dim)
        block, span = doubled, span * 2


def _erode(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The bool mask (H, W) less `width` pixels all round its edge: eroded by a (2 width + 1)² square, as a
    line along each axis, the image's border counting as mask. Its cost grows with the pixels and only
    with the logarithm of `width`, so a photo's outline costs no more per pixel than a thumbnail's."""
    for dim in (0, 1):
        # Runs ahead from `width` before each pixel are the square's line centred on it.
        before = torch.ones((width, mask.shape[1]) if dim == 0 else (mask.shape[0], width), dtype=torch.bool)
        mask = _runs_ahead(torch.cat([before, mask], dim), 2 * width + 1, dim).narrow(dim, 0, mask.shape[dim])
    return mask


# Pixels drawn at a time: bounds the copies of a photo the overlay makes, whatever its size.
STRIP_PIXELS = 2**20


@functools.cache
def _overlay_table() -> torch.Tensor:
    """uint8 (3, 4 x 256): each channel's drawn value for a photo's value (0-255) in each place: outside the
    pet, inside it, on the outline's outer line, on its inner line. The first two are draw_segmentation_masks'
    own blend (in float, truncated), so a lookup gives its pixels; the outline is solid colour."""
    ramp = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256).contiguous()
    blended = [
        draw_segmentation_masks(ramp, torch.full((1, 256), inside), alpha=TINT_ALPHA, colors=PREDICTION_COLOR)[:, 0]
        for inside in (False, True)
    ]
    solid = [
        torch.tensor(ImageColor.getrgb(color), dtype=torch.uint8)[:, None].expand(3, 256) for color in OUTLINE_COLORS
    ]
    return torch.cat([*blended, *solid], dim=1)


def prediction_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The photo (uint8 (3, H, W)) with the predicted pet tinted and outlined, for users' own images.
    Its time and memory grow with the photo's pixels alone; it is laid out (H, W, 3) in memory, as a PNG is."""
    # The outline keeps the mask's edge readable where the tint blends into the pet; it lies inside the mask.
    width = max(1, round(min(mask.shape) / 150))
    inner, innermost = _erode(mask, width), _erode(mask, 2 * width)
    table = _overlay_table()
    overlay = torch.empty((*mask.shape, 3), dtype=torch.uint8).permute(2, 0, 1)
    step = max(1, STRIP_PIXELS // max(1, mask.shape[1]))  # rows per strip
    for rows in (slice(start, start + step) for start in range(0, mask.shape[0], step)):
        # 0 outside, 1 inside, 2 the outer line (inside, not in `inner`), 3 the inner line (in `inner` only).
        place = mask[rows].long() + (mask[rows] & ~inner[rows]) + 2 * (inner[rows] & ~innermost[rows])
        index = image[:, rows].long() + 256 * place
        overlay[:, rows] = table.gather(1, index.reshape(3, -1)).view(index.shape)
    return overlay


def plot_cases(sections: Sequence[tuple[str, Sequence[Case]]], path: Path, title: str = "") -> None:
    """Each section (e.g. random images, then the worst ones) as rows of up to MAX_COLUMNS overlays, errors coloured."""
    sections = [(heading, cases) for heading, cases in sections if cases]
    columns = min(MAX_COLUMNS, max(len(cases) for _, cases in sections))
    rows = [math.ceil(len(cases) / columns) for _, cases in sections]
    fig = plt.figure(figsize=(2.4 * columns, 2.6 * sum(rows) + 0.8), layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, squeeze=False, height_ratios=rows)[:, 0]
    for subfig, section_rows, (heading, cases) in zip(subfigs, rows, sections, strict=True):
        subfig.suptitle(heading, fontsize=10, **AS_TYPED)
        for index, ax in enumerate(subfig.subplots(section_rows, columns, squeeze=False).flat):
            ax.axis("off")
            if index < len(cases):
                case = cases[index]
                ax.imshow(error_overlay(case.image, case.truth, case.prediction).permute(1, 2, 0).numpy())
                ax.set_title(case.caption, fontsize=8, **AS_TYPED)
    legend = [Patch(color=color, label=label) for label, color in ERROR_COLORS.items()]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), frameon=False, fontsize=9)
    fig.suptitle(title, **AS_TYPED)
    _save(fig, path)


def learning_curves_figure(runs: Sequence[tuple[str, Sequence[dict]]], title: str = "") -> plt.Figure:
    """Train and valid Dice and loss per epoch of one or more runs on shared axes: one colour per run,
    valid solid with dots, train dashed with hollow squares, each run's best valid epoch starred."""
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    # A short run's points would otherwise hide in its lines (and a 1-epoch run is nothing but points).
    short = [len(history) < 30 for _, history in runs]
    run_lines = []  # handed to the legend as they are: it would leave out a run whose name starts with "_"
    for index, ((label, history), points) in enumerate(zip(runs, short, strict=True)):
        color = f"C{index}"
        epochs = [row["epoch"] for row in history]
        valid_marker, train_marker = (VALID_MARKER, TRAIN_MARKER) if points else (None, None)
        for ax, metric in ((ax_dice, "dice"), (ax_loss, "loss")):
            valid = [row[f"valid_{metric}"] for row in history]
            train = [row[f"train_{metric}"] for row in history]
            valid_line = ax.plot(epochs, valid, color=color, marker=valid_marker, label=label)[0]
            ax.plot(epochs, train, color=color, marker=train_marker, markerfacecolor="none", linestyle="--")
            if ax is ax_dice:
                run_lines.append(valid_line)
        best = max(history, key=lambda row: row["valid_dice"])
        ax_dice.plot(best["epoch"], best["valid_dice"], marker=BEST_MARKER, linestyle="", color=color, markersize=12)
    ax_dice.set(title="Dice", ylabel="Dice (mean per image)")
    # Early losses are many times the late ones; a log scale keeps the end of training readable.
    ax_loss.set(title="loss", yscale="log", ylabel="BCE + soft Dice loss (log scale)")
    # Half an epoch of room each side: a 1-epoch run gets the axis 0.5..1.5, not matplotlib's 0.945..1.055.
    all_epochs = [row["epoch"] for _, history in runs for row in history]
    for ax in (ax_dice, ax_loss):
        ax.set(xlabel="epoch", xlim=(min(all_epochs) - 0.5, max(all_epochs) + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    valid_marker, train_marker = (VALID_MARKER, TRAIN_MARKER) if any(short) else (None, None)
    best_label = "best valid epoch (its best.pt)"
    key = [
        Line2D([], [], color="gray", marker=valid_marker, label="valid"),
        Line2D([], [], color="gray", marker=train_marker, markerfacecolor="none", linestyle="--", label="train"),
        Line2D([], [], color="gray", marker=BEST_MARKER, linestyle="", markersize=12, label=best_label),
    ]
    plt.setp(ax_dice.legend(handles=[*run_lines, *key], fontsize=8).get_texts(), **AS_TYPED)
    ax_loss.legend(handles=key[:2], fontsize=8)
    fig.suptitle(title, **AS_TYPED)
    return fig


def plot_learning_curves(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, title: str = "") -> None:
    """learning_curves_figure saved as a PNG (train.py's curves.png, compare.py's figure)."""
    _save(learning_curves_figure(runs, title), path)


def plot_learning_curves_or_warn(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, title: str = "") -> bool:
    """plot_learning_curves, where a figure that cannot be drawn or written is a warning, not an error: a figure
    is never worth the checkpoint or the results that would not be written after it. Whether it was drawn."""
    figures_before = set(plt.get_fignums())
    try:
        plot_learning_curves(runs, path, title)
    except Exception as error:  # noqa: BLE001 - any drawing failure (a font, a bad value, the disk) is the same to us
        for number in set(plt.get_fignums()) - figures_before:
            plt.close(number)  # half-made figures would otherwise stay in pyplot's keeping
        print(
            f"warning: could not draw {display_path(Path(path))} ({type(error).__name__}: {error}); "
            "the run goes on without it, and its numbers are in history.csv.",
            file=sys.stderr,
        )
        return False
    return True
