"""--deterministic means it: bilinear upsampling as matrix products equals F.interpolate, a training step's
backward holds no operation PyTorch has no deterministic CUDA algorithm for, and (on a GPU) it repeats."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import devices
import losses
from models import MODEL_NAMES, build_model
from models.upsample import resize_bilinear

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# The backward functions of the operations torch.use_deterministic_algorithms lists as raising on CUDA
# when differentiated (interpolate's linear modes, adaptive and 3-D pooling, reflection padding, grid_sample,
# NLL and CTC losses, max-mode EmbeddingBag, unpooling).
NONDETERMINISTIC_ON_CUDA = re.compile(
    r"upsample(linear|bilinear|bicubic|trilinear)|adaptive(avg|max)pool|avgpool3d|fractionalmaxpool|maxunpool|"
    r"reflectionpad|nllloss|ctcloss|embeddingbag|gridsampler",
    re.IGNORECASE,
)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Deterministic algorithms on for the test, as train.py --deterministic sets them, then off again."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


SIZES = [((8, 8), (16, 16)), ((7, 5), (16, 11)), ((5, 9), (3, 4)), ((13, 13), (13, 13)), ((1, 3), (4, 7)),
         ((33, 17), (65, 34)), ((16, 16), (256, 256))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("size", "out"), SIZES, ids=lambda size: "x".join(map(str, size)))
def test_upsampling_as_matrix_products_equals_f_interpolate_forward_and_backward(
    dtype: torch.dtype, size: tuple[int, int], out: tuple[int, int], deterministic: None
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=dtype, requires_grad=True)
    expected = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    resized = resize_bilinear(x, out)
    assert "UpsampleBilinear" not in type(resized.grad_fn).__name__, "the matrix path ran"
    exact = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(resized, expected, **(exact if dtype == torch.float64 else {}))
    upstream = torch.randn_like(expected)
    # A gradient pixel sums up to (out / in)² terms, in another order: float32 rounding grows with them.
    summed = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(torch.autograd.grad(resized, x, upstream)[0],
                               torch.autograd.grad(expected, x, upstream)[0],
                               **(exact if dtype == torch.float64 else summed))


def test_upsampling_keeps_dtype_and_layout_under_autocast(deterministic: None) -> None:
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    with devices.autocast(CPU, enabled=True):
        half = F.relu(x.bfloat16())  # what a decoder block receives under autocast
        resized = resize_bilinear(half, (16, 16))
    assert resized.dtype == torch.bfloat16 and resized.is_contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(half, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(resized, expected), "2x weights are exact in any precision"


def test_without_deterministic_algorithms_f_interpolate_itself_runs() -> None:
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    assert type(resize_bilinear(x, (8, 8)).grad_fn).__name__.startswith("UpsampleBilinear2D")


def backward_functions(name: str, amp: bool) -> set[str]:
    """Names of the backward functions of one training step as train_one_epoch takes it: deep supervision on
    (its term upsamples too), channels-last, autocast when `amp`."""
    torch.manual_seed(0)
    model = build_model(name, deep_supervision=True).train().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with devices.autocast(CPU, amp):
        logits, aux_logits = model(images)
    loss = losses.bce_dice(logits, masks) + losses.auxiliary_loss(losses.bce_dice, aux_logits, masks)
    seen, names, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_deterministic_training_step_has_no_backward_without_a_deterministic_cuda_algorithm(
    name: str, deterministic: None
) -> None:
    found = {node for node in backward_functions(name, amp=True) if NONDETERMINISTIC_ON_CUDA.search(node)}
    assert not found, f"{name}: {found} would raise on CUDA under --deterministic"


def test_the_check_sees_bilinear_upsampling_when_it_is_there() -> None:
    names = backward_functions("resnet34_unet", amp=False)
    assert any(NONDETERMINISTIC_ON_CUDA.search(node) for node in names), names


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_deterministic_upsampling_gradients_repeat_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    devices.configure_backends(CUDA, deterministic=True)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 64, 32, 32, device=CUDA, requires_grad=True)
        upstream = torch.randn(8, 64, 64, 64, device=CUDA)
        with pytest.raises(RuntimeError, match="deterministic"):  # why the matrix path exists
            F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).backward(upstream)
        gradients = [torch.autograd.grad(resize_bilinear(x, (64, 64)), x, upstream)[0] for _ in range(3)]
        assert all(torch.equal(gradient, gradients[0]) for gradient in gradients)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
