"""Score a saved checkpoint on the test split and draw its predictions over the images.

    python src/inference.py -m saved_models/RUN/best.pt
    python src/inference.py -m saved_models/RUN          # a run folder means its best.pt

Prints the same `Test Dice:` line train.py printed for that checkpoint and writes a PNG of
test images with the ground truth and the prediction overlaid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from checkpoint import resolve_checkpoint_path
from evaluate import add_eval_args, checkpoint_loader, evaluate, format_result, load_for_eval
from oxford_pet import prepare_dataset
from plots import plot_predictions
from utils import autocast, logits_to_mask, run_script, unused_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Test Dice of a petseg checkpoint, and a figure of its predictions on test images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_eval_args(parser)
    parser.add_argument("-k", "--num-images", type=int, default=8, help="test images shown in the figure")
    parser.add_argument(
        "--figure", type=Path, default=None,
        help="where to write the PNG (default: test_predictions.png beside the checkpoint; an existing file is never overwritten)",
    )
    return parser.parse_args(argv)


def denormalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised float images back to uint8 for display."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return ((images * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    checkpoint, model, device, amp = load_for_eval(args)
    data_path = prepare_dataset(args.data_path)
    loader = checkpoint_loader(data_path, "test", checkpoint, args.batch_size, args.num_workers, device)
    result = evaluate(model, loader, device, amp=amp, desc="test")
    print(f"{checkpoint['network']} from epoch {checkpoint['epoch']} (valid Dice {checkpoint['valid_dice']:.4f}); "
          f"test set: {len(loader.dataset)} images")
    print(format_result("test", result))

    dataset = loader.dataset
    count = min(args.num_images, len(dataset))
    # Evenly spaced over the split, so the same checkpoint always shows the same images.
    indexes = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    images, masks = (torch.stack(tensors) for tensors in zip(*(dataset[i] for i in indexes)))
    with torch.no_grad(), autocast(device, amp):
        logits = model(images.to(device)).float().cpu()
    figure = args.figure or resolve_checkpoint_path(args.model).parent / "test_predictions.png"
    figure = unused_path(figure)
    plot_predictions(
        denormalize(images, checkpoint["mean"], checkpoint["std"]),
        masks[:, 0].bool(),
        logits_to_mask(logits)[:, 0],
        [result.per_image_dice[i] for i in indexes],
        [dataset.names[i] for i in indexes],
        figure,
        title=f"{checkpoint['network']}, test Dice {result.dice:.4f}  (green: ground truth, orange: prediction)",
    )
    print(f"Wrote {figure}")


if __name__ == "__main__":
    run_script(main)
