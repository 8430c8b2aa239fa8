"""--ema: an exponential moving average of the weights, warmed up, updated after every optimiser step."""

from __future__ import annotations

import copy
from itertools import chain

import torch
from torch import nn


class MovingAverage(nn.Module):
    """The average of a model's weights and BatchNorm statistics, in `module`.

    Early on the average follows the model closely, so that it is useful from the first epoch: update n
    moves it by 1 - min(decay, (1 + n) / (10 + n)). The count of updates is kept on the host, so an update
    never waits for the GPU (torch's AveragedModel reads its counter back from the device at every step);
    the state_dict is AveragedModel's (`module.*` and `n_averaged`), so runs saved with it resume.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = list(chain(self.module.parameters(), self.module.buffers()))
        current = [tensor.detach() for tensor in chain(model.parameters(), model.buffers())]
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        counters = [(a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()]
        if self.updates == 0:
            torch._foreach_copy_([a for a, _ in floats], [c for _, c in floats])
        else:
            weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        if counters:  # BatchNorm's step counters
            torch._foreach_copy_([a for a, _ in counters], [c for _, c in counters])
        self.updates += 1
        self.n_averaged.fill_(self.updates)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):  # noqa: ANN201
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)
        return result
