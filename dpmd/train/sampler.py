"""Which frames each training step sees, as DeePMD-kit draws them, with a resumable state.

A step picks a system (probability from `auto_prob`), then takes the next `batch_size` frames of
that system's current shuffled order (reshuffled when exhausted).  With several data-parallel
workers every worker draws the same global batch of batch_size * world frames and keeps its own
slice, so N workers with batch B train exactly like one worker with batch N*B.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dpmd.errors import ConfigError


def resolve_batch_sizes(batch_size, systems) -> list[int]:
    """Frames per batch of each system, at most the system's frame count (as DeePMD-kit caps them): a batch
    never repeats a frame, and a huge batch_size cannot blow up memory."""
    if isinstance(batch_size, list):
        sizes = list(batch_size)
    elif isinstance(batch_size, int):
        sizes = [batch_size] * len(systems)
    else:   # 'auto[:N]': at least N atoms (N = 32), 'max:N': at most N atoms; at least one frame either way
        kind, _, n = batch_size.partition(":")
        rule = int(n) if n else 32
        sizes = [math.ceil(rule / s.natoms) if kind == "auto" else rule // s.natoms for s in systems]
    return [max(1, min(size, s.nframes)) for size, s in zip(sizes, systems)]


def system_probabilities(auto_prob: str, nbatches: list[int], sys_probs: list[float] | None = None) -> np.ndarray:
    """Probability of drawing each system: sys_probs when given (DeePMD-kit's rule: negative entries share
    what the others leave, by number of batches), else by auto_prob."""
    n = np.asarray(nbatches, dtype=float)
    if sys_probs is not None:
        probs = np.asarray(sys_probs, dtype=float)
        given = probs >= 0
        rest = 1.0 - probs[given].sum()
        if not np.isclose(rest, 0.0):
            probs = np.where(given, probs, rest * n * ~given / (n * ~given).sum())
        return probs / probs.sum()
    if auto_prob == "prob_uniform":
        return np.full(len(n), 1.0 / len(n))
    if auto_prob == "prob_sys_size":
        return n / n.sum()
    # "prob_sys_size;start:end:weight;..." : blocks of systems with weights, by size within a block
    probs = np.zeros(len(n))
    for block in auto_prob.split(";")[1:]:
        try:
            start, end, weight = block.split(":")
            start, end, weight = int(start), int(end), float(weight)
        except ValueError:
            raise ConfigError(f"auto_prob block {block!r}: expected start:end:weight") from None
        if not 0 <= start < end <= len(n):
            raise ConfigError(f"auto_prob block {block!r}: system range outside 0..{len(n)}")
        probs[start:end] = weight * n[start:end] / n[start:end].sum()
    if probs.sum() <= 0:
        raise ConfigError(f"auto_prob {auto_prob!r} gives every system zero probability")
    return probs / probs.sum()


class BatchSampler:
    def __init__(self, systems, batch_size, auto_prob: str, seed: int | None, world: int = 1,
                 sys_probs: list[float] | None = None):
        self.sizes = resolve_batch_sizes(batch_size, systems)
        self.nframes = [s.nframes for s in systems]
        self.world = world
        # batches per system as DeePMD-kit counts them (its DataLoader keeps a last, short batch)
        nbatches = [math.ceil(nf / bs) for nf, bs in zip(self.nframes, self.sizes)]
        self.probs = torch.as_tensor(system_probabilities(auto_prob, nbatches, sys_probs))
        self.gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.order = [torch.randperm(nf, generator=self.gen) for nf in self.nframes]
        self.cursor = [0] * len(self.nframes)
        self.last: tuple[int, list[int]] = (0, [])  # the last global batch: (system, frames), for messages

    def next(self, rank: int = 0) -> tuple[int, torch.Tensor]:
        """(system index, frame indices) of this worker's share of the next global batch."""
        i = int(torch.multinomial(self.probs, 1, generator=self.gen)) if len(self.probs) > 1 else 0
        need = self.sizes[i] * self.world
        frames = []
        while need > 0:
            if self.cursor[i] >= self.nframes[i]:
                self.order[i] = torch.randperm(self.nframes[i], generator=self.gen)
                self.cursor[i] = 0
            take = self.order[i][self.cursor[i]:self.cursor[i] + need]
            frames.append(take)
            self.cursor[i] += take.numel()
            need -= take.numel()
        frames = torch.cat(frames)
        self.last = (i, frames.tolist())
        per = self.sizes[i]
        return i, frames[rank * per:(rank + 1) * per]

    def epoch_steps(self) -> int:
        """Steps of one epoch, as DeePMD-kit 3 counts them for numb_epoch: ceil(max_i(batches_i / p_i)) over
        the systems drawn, batches_i = ceil(frames_i / global batch_i)."""
        return max(math.ceil(math.ceil(nf / (bs * self.world)) / float(p))
                   for nf, bs, p in zip(self.nframes, self.sizes, self.probs) if p > 0)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": self.order, "cursor": list(self.cursor)}

    def fits(self, state: dict) -> bool:
        """Whether a saved state was drawn over systems with these frame counts."""
        return [len(o) for o in state["order"]] == self.nframes

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order = list(state["order"])
        self.cursor = list(state["cursor"])
