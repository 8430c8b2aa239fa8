"""Figures: learning curves, runs compared, test cases with their errors, and overlays of users' photos."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run on headless GPU machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torchvision.utils import draw_segmentation_masks  # noqa: E402

from utils import atomic_write  # noqa: E402

PREDICTION_COLOR = "#f97316"
# Okabe-Ito colours: told apart with every common kind of colour blindness.
ERROR_COLORS = {
    "pet, found (true positive)": "#009E73",
    "background called pet (false positive)": "#E69F00",
    "pet missed (false negative)": "#CC79A7",
}


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_write(Path(path)) as file:
        fig.savefig(file, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


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


def prediction_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The photo (uint8 (3, H, W)) with the predicted pet tinted and outlined, for users' own images."""
    # The outline keeps the mask's edge readable where the tint blends into a similarly coloured pet.
    width = max(1, round(min(mask.shape) / 150))
    kernel = 2 * width + 1
    eroded = -F.max_pool2d(-mask[None, None].float(), kernel, stride=1, padding=width)[0, 0] > 0
    tinted = draw_segmentation_masks(image, mask, alpha=0.4, colors=PREDICTION_COLOR)
    return draw_segmentation_masks(tinted, mask & ~eroded, alpha=1.0, colors=PREDICTION_COLOR)


def plot_cases(sections: Sequence[tuple[str, Sequence[Case]]], path: Path, title: str = "") -> None:
    """One row of overlays per section (e.g. random images, then the worst ones), errors coloured."""
    sections = [(heading, cases) for heading, cases in sections if cases]
    columns = max(len(cases) for _, cases in sections)
    fig = plt.figure(figsize=(2.4 * columns, 2.6 * len(sections) + 0.8), layout="constrained")
    for subfig, (heading, cases) in zip(fig.subfigures(len(sections), 1, squeeze=False)[:, 0], sections):
        subfig.suptitle(heading, fontsize=10)
        for ax, case in zip(subfig.subplots(1, columns, squeeze=False)[0], [*cases, *[None] * columns]):
            ax.axis("off")
            if case is not None:
                ax.imshow(error_overlay(case.image, case.truth, case.prediction).permute(1, 2, 0).numpy())
                ax.set_title(case.caption, fontsize=8)
    legend = [Patch(color=color, label=label) for label, color in ERROR_COLORS.items()]
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), frameon=False, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def plot_learning_curves(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, title: str = "") -> None:
    """Train and valid Dice and loss per epoch of one or more runs on shared axes: one colour per run,
    valid solid, train dashed, each run's best valid epoch marked (train.py's curves.png, compare.py's figure)."""
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for index, (label, history) in enumerate(runs):
        color = f"C{index}"
        epochs = [row["epoch"] for row in history]
        marker = "." if len(epochs) < 30 else None  # a short run's points would otherwise hide in its lines
        for ax, metric in ((ax_dice, "dice"), (ax_loss, "loss")):
            ax.plot(epochs, [row[f"valid_{metric}"] for row in history], color=color, marker=marker, label=label)
            ax.plot(epochs, [row[f"train_{metric}"] for row in history], color=color, marker=marker, linestyle="--")
        best = max(history, key=lambda row: row["valid_dice"])
        ax_dice.plot(best["epoch"], best["valid_dice"], marker="o", color=color, markersize=7)
    ax_dice.set_title("Dice")
    ax_dice.set_ylabel("Dice (mean per image)")
    ax_loss.set_title("loss")
    # Early losses are many times the late ones; a log scale keeps the end of training readable.
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("BCE + soft Dice loss (log scale)")
    for ax in (ax_dice, ax_loss):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    key = [
        Line2D([], [], color="gray", label="valid"),
        Line2D([], [], color="gray", linestyle="--", label="train"),
        Line2D([], [], color="gray", marker="o", linestyle="", label="best valid epoch (its best.pt)"),
    ]
    ax_dice.legend(handles=[*ax_dice.get_legend_handles_labels()[0], *key], fontsize=8)
    ax_loss.legend(handles=key[:2], fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
