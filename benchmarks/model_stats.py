"""Print parameter counts and measured FLOPs of every registered model, and of the architecture options
train.py offers, as a markdown table."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli import argument_parser  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from models.stats import count_flops, count_parameters, count_saved_bytes  # noqa: E402

# (train.py flags, network, constructor arguments) of the options, beside the defaults.
OPTIONS = [
    ("--deep-supervision", "unet", {"deep_supervision": True}),
    ("--deep-supervision", "resnet34_unet", {"deep_supervision": True}),
    ("--full-res-skip", "resnet34_unet", {"full_resolution_skip": True}),
    ("--decoder-channels 256 128 64 64 32", "resnet34_unet", {"decoder_channels": (256, 128, 64, 64, 32)}),
]


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--image-size", type=int, default=256, help="side of the square input image, in pixels")
    args = parser.parse_args()

    print(f"Input: 1x3x{args.image_size}x{args.image_size}; FLOPs from FlopCounterMode (2 per MAC).\n")
    print("| model | parameters (M) | forward GFLOPs/image | train step GFLOPs/image |")
    print("|---|---:|---:|---:|")
    models = [(name, name, {}) for name in MODEL_NAMES]
    models += [(f"{name} `{flags}`", name, kwargs) for flags, name, kwargs in OPTIONS]
    # FLOP counting needs only shapes, so the meta device skips the real arithmetic.
    with torch.device("meta"):
        for label, name, kwargs in models:
            model = build_model(name, **kwargs).train()
            params = count_parameters(model)
            # Deep supervision's extra heads cost in training only; the forward pass is the one inference runs.
            forward = count_flops(model.eval(), args.image_size, backward=False)
            train_step = count_flops(model.train(), args.image_size, backward=True)
            print(f"| {label} | {params / 1e6:.2f} | {forward / 1e9:.2f} | {train_step / 1e9:.2f} |")
    print(f"\nKept for the backward pass, MiB per image at {args.image_size}² (measured at 64², scaled):\n")
    print("| model | float32 | bfloat16 autocast |")
    print("|---|---:|---:|")
    for name in MODEL_NAMES:
        model = build_model(name)
        scale = (args.image_size / 64) ** 2 / 2**20
        full, half = (count_saved_bytes(model, 64, half) * scale for half in (False, True))
        print(f"| {name} | {full:.0f} | {half:.0f} |")


if __name__ == "__main__":
    main()
