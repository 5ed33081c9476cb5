"""DeePMD-kit's exponential learning rate (with its warmup) and the loss-prefactor schedule tied to it."""

from __future__ import annotations

import math

from dpmd.errors import ConfigError


class ExpDecayLR:
    """DeePMD-kit 3's `exp` schedule (deepmd/dpmodel/utils/learning_rate.py):

    warmup (t < w): lr = f * start_lr + (1 - f) * start_lr * t / w   (w = warmup_steps, f = warmup_start_factor)
    then, with u = t - w:  lr = max(start_lr * decay_rate ** (u // decay_steps), stop_lr)   (u / decay_steps if
    smooth), decay_rate by default the one that reaches stop_lr at the last step.  As in DeePMD-kit, a
    decay_steps >= the decay phase is shrunk (to 100, or steps // 100 + 1 for short runs) unless decay_rate
    is given.
    """

    def __init__(self, start_lr: float, stop_lr: float, decay_steps: int, numb_steps: int, *,
                 decay_rate: float | None = None, smooth: bool = False, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.0):
        decay_total = numb_steps - warmup_steps
        if decay_rate is None and decay_steps >= decay_total:
            decay_steps = 100 if decay_total // 10 > 100 else decay_total // 100 + 1
        if decay_rate is None:
            decay_rate = 1.0 if decay_total == 0 else math.exp(
                math.log(max(stop_lr, 1e-10) / start_lr) / (decay_total / decay_steps))
        self.start_lr, self.stop_lr, self.decay_steps, self.decay_rate = start_lr, stop_lr, decay_steps, decay_rate
        self.smooth, self.warmup_steps, self.warmup_start_lr = smooth, warmup_steps, warmup_start_factor * start_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.start_lr - self.warmup_start_lr) * step / self.warmup_steps
        t = step - self.warmup_steps
        exponent = t / self.decay_steps if self.smooth else t // self.decay_steps
        return max(self.start_lr * self.decay_rate ** exponent, self.stop_lr)


def learning_rate(section: dict, numb_steps: int) -> ExpDecayLR:
    """The schedule of a normalised `learning_rate` section (dpmd.train.config) over numb_steps."""
    stop_lr = section["stop_lr"] if section["stop_lr_ratio"] is None else section["start_lr"] * section["stop_lr_ratio"]
    warmup = (section["warmup_steps"] if section["warmup_ratio"] is None
              else int(section["warmup_ratio"] * numb_steps))
    if warmup >= numb_steps:
        raise ConfigError(f"'learning_rate.warmup_steps' ({warmup}) must be smaller than the training steps "
                          f"({numb_steps})")
    return ExpDecayLR(section["start_lr"], stop_lr, section["decay_steps"], numb_steps,
                      decay_rate=section["decay_rate"], smooth=section["smooth"], warmup_steps=warmup,
                      warmup_start_factor=section["warmup_start_factor"])


def prefactor(start: float, limit: float, lr: float, start_lr: float) -> float:
    """DeePMD's loss prefactor: limit + (start - limit) * lr / start_lr."""
    return limit + (start - limit) * lr / start_lr
