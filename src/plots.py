"""Figures: learning curves of a run and ground-truth / prediction overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run on headless GPU machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torchvision.utils import draw_segmentation_masks  # noqa: E402

from utils import atomic_write  # noqa: E402

GROUND_TRUTH_COLOR = "#22c55e"
PREDICTION_COLOR = "#f97316"


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_write(Path(path)) as file:
        fig.savefig(file, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_history(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Loss and Dice per epoch, train against valid."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, metric in ((ax_loss, "loss"), (ax_dice, "dice")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], label="train")
        ax.plot(epochs, [row[f"valid_{metric}"] for row in history], label="valid")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("BCE + soft Dice loss" if metric == "loss" else "Dice (mean per image)")
        ax.grid(alpha=0.3)
        ax.legend()
    best = max(history, key=lambda row: row["valid_dice"])
    ax_dice.axvline(best["epoch"], color="gray", linestyle=":")
    ax_dice.set_title(f"best valid Dice {best['valid_dice']:.4f} at epoch {best['epoch']}")
    fig.suptitle(title)
    _save(fig, path)


def plot_predictions(
    images: torch.Tensor,
    gt_masks: torch.Tensor,
    pred_masks: torch.Tensor,
    dices: Sequence[float],
    names: Sequence[str],
    path: Path,
    title: str = "",
) -> None:
    """One row per image: the photo, the ground truth overlaid, the prediction overlaid with its Dice.

    images: uint8 (N, 3, H, W); masks: bool (N, H, W).
    """
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows + 0.4), squeeze=False, layout="constrained")
    for row, (image, gt, pred, dice, name) in enumerate(zip(images, gt_masks, pred_masks, dices, names)):
        panels = (
            (image, name),
            (draw_segmentation_masks(image, gt, alpha=0.5, colors=GROUND_TRUTH_COLOR), "ground truth"),
            (draw_segmentation_masks(image, pred, alpha=0.5, colors=PREDICTION_COLOR), f"prediction, Dice {dice:.3f}"),
        )
        for ax, (picture, label) in zip(axes[row], panels):
            ax.imshow(picture.permute(1, 2, 0).numpy())
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    _save(fig, path)
