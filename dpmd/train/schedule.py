"""DeePMD-kit's exponential learning rate and the loss-prefactor schedule tied to it."""

from __future__ import annotations

import math


class ExpDecayLR:
    """lr(t) = start_lr * r ** (t // decay_steps), with r = (stop_lr / start_lr) ** (decay_steps / numb_steps).

    As in DeePMD-kit 3, a decay_steps >= numb_steps is shrunk (to 100, or numb_steps // 100 + 1
    for short runs) so that short runs still decay.
    """

    def __init__(self, start_lr: float, stop_lr: float, decay_steps: int, numb_steps: int):
        if decay_steps >= numb_steps:
            decay_steps = 100 if numb_steps // 10 > 100 else numb_steps // 100 + 1
        self.start_lr, self.stop_lr, self.decay_steps = start_lr, stop_lr, decay_steps
        self.decay_rate = math.exp(math.log(stop_lr / start_lr) / (numb_steps / decay_steps))

    def __call__(self, step: int) -> float:
        return self.start_lr * self.decay_rate ** (step // self.decay_steps)


def prefactor(start: float, limit: float, lr: float, start_lr: float) -> float:
    """DeePMD's loss prefactor: limit + (start - limit) * lr / start_lr."""
    return limit + (start - limit) * lr / start_lr
