"""Print parameter counts and measured FLOPs of every registered model as a markdown table."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli import argument_parser  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from models.stats import count_flops, count_parameters  # noqa: E402


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=256, help="side of the square input image, in pixels")
    args = parser.parse_args()

    print(f"Input: 1x3x{args.image_size}x{args.image_size}; FLOPs from FlopCounterMode (2 per MAC).\n")
    print("| model | parameters (M) | forward GFLOPs/image | train step GFLOPs/image |")
    print("|---|---:|---:|---:|")
    # FLOP counting needs only shapes, so the meta device skips the real arithmetic.
    with torch.device("meta"):
        for name in MODEL_NAMES:
            model = build_model(name).train()
            params = count_parameters(model)
            forward = count_flops(model, args.image_size, backward=False)
            train_step = count_flops(model, args.image_size, backward=True)
            print(f"| {name} | {params / 1e6:.2f} | {forward / 1e9:.2f} | {train_step / 1e9:.2f} |")


if __name__ == "__main__":
    main()
