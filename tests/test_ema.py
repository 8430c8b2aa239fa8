"""--ema: the moving average warms up, then decays at the given rate (its training run: test_recipe_options)."""

from __future__ import annotations

import pytest
import torch

from ema import MovingAverage


def test_the_average_warms_up_then_decays_at_the_given_rate() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    average = MovingAverage(model, decay=0.9)
    expected = model.weight.item()
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update_parameters(model)
        decay = min(0.9, step / (9 + step))  # (1 + n) / (10 + n) with n = step - 1 averages so far
        expected = decay * expected + (1 - decay) * step if step > 1 else step
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-6)
