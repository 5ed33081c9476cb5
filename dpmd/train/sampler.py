"""Which frames each training step sees: DeePMD-kit's frame sequence, random draw for random draw, resumable.

A step picks a system (probability from `auto_prob`), then takes the next `batch_size` frames of that system's
current shuffled order (a new shuffle when exhausted).  `dp --pt train` does this with torch DataLoaders whose
random numbers all come from torch's generators, so the same calls on the same generators give its sequence:

- main: the main process's global generator, seeded by setup_seed([rank, seed]).  Each DataLoader iterator
  created there draws one int64 "base seed" (the DpLoaderSet constructors and the statistics' make_stat_input
  create some before training; the statistics read the first data_stat_nbatch batches of each system's shuffle,
  drawn only when something is computed from them: statistics_frames); the system-choosing loader (a
  WeightedRandomSampler over the systems, one epoch = all systems' batches x max(workers, 1) draws) draws its
  base seed and then its whole epoch of system indices with one torch.multinomial.  Training and validation
  loaders draw from this one generator, in step order.
- workers: with NUM_WORKERS loader worker processes (DeePMD-kit's default min(4, cpus)), step k's batch comes
  from worker k % workers, whose generator is seeded base seed + worker index and which holds its own copy of
  every system's iterator; workers (and those copies) start afresh each system-choosing epoch.  With 0 workers
  the main generator does their part and the system iterators persist.
- a system's iterator draws an int64 seed when first read (RandomSampler), shuffles with randperm on a
  generator seeded by it, and gives batches of batch_size in that order, the last one short; when exhausted
  a new iterator is made (one base-seed draw, then the same).

A mixed-type folder (dpmd: one System per composition) is one DeePMD-kit system: its batch size, batch count and
probability are the folder's, each composition drawn by its share of the frames (the weights are DeePMD-kit's, the
frames of such a folder are not: DeePMD-kit batches its compositions together).

With one process this is DeePMD-kit's sequence (tests/test_train_sampling.py checks it against recorded
DeePMD-kit runs).  With several data-parallel workers every worker draws the same sequence for the global
batch of batch_size * world frames and keeps its own slice; a shuffle's last, short global batch is filled up
from the next shuffle, so every worker gets batch_size frames and N workers with batch B train exactly like
one worker with batch N*B whenever the global batch divides the frame counts (DeePMD-kit's own data-parallel
sampling, a DistributedSampler per system, has no such equivalence).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from typing import NamedTuple

import numpy as np
import torch

from dpmd.data import source_groups
from dpmd.errors import ConfigError
from dpmd.model.network import MLP, seeded_generator


class _Folder(NamedTuple):
    """What batch sizes depend on, of a DeePMD-kit system (a mixed-type folder counts its parts' frames)."""
    natoms: int
    nframes: int


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
    what the others leave, by number of batches), else by auto_prob.  The arithmetic is DeePMD-kit's
    (deepmd/utils/data_system.py), to the last bit: the systems drawn with these weights are its draws."""
    n = np.asarray(nbatches, dtype=float)
    if sys_probs is not None:
        probs = np.asarray(sys_probs, dtype=float)
        given = probs >= 0
        rest = 1.0 - probs[given].sum()
        if np.isclose(rest, 0.0):
            return np.where(given, probs, 0.0)
        return np.where(given, probs, rest * n * ~given / (n * ~given).sum())
    if auto_prob == "prob_uniform":
        return np.full(len(n), 1.0 / len(n))
    # "prob_sys_size;start:end:weight;..." : blocks of systems with weights, by size within a block
    blocks = [f"0:{len(n)}:1.0"] if auto_prob == "prob_sys_size" else auto_prob.split(";")[1:]
    ranges, weights = [], []
    for block in blocks:
        try:
            start, end, weight = block.split(":")
            start, end, weight = int(start), int(end), float(weight)
        except ValueError:
            raise ConfigError(f"auto_prob block {block!r}: expected start:end:weight") from None
        if not 0 <= start < end <= len(n) or weight < 0:
            raise ConfigError(f"auto_prob block {block!r}: expected a system range inside 0..{len(n)} and a "
                              f"weight >= 0")
        ranges.append((start, end))
        weights.append(weight)
    if sum(weights) <= 0:
        raise ConfigError(f"auto_prob {auto_prob!r} gives every system zero probability")
    probs = np.zeros(len(n))
    for (start, end), weight in zip(ranges, np.asarray(weights) / np.sum(weights)):
        probs[start:end] = n[start:end] / n[start:end].sum() * weight
    return probs


def deepmd_loader_workers() -> int:
    """DeePMD-kit's DataLoader worker count (deepmd/pt/utils/env.py NUM_WORKERS): the NUM_WORKERS environment
    variable, else min(4, cpus); 0 where processes are not forked.  Its frame sequence depends on it."""
    value = os.environ.get("NUM_WORKERS")
    if value is not None:
        try:
            workers = int(value)
        except ValueError:
            raise ConfigError(f"environment variable NUM_WORKERS={value!r}: expected a whole number") from None
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(4, cpus)
    start = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return max(workers, 0) if start == "fork" else 0


def _draw(gen: torch.Generator) -> int:
    """One int64 as a DataLoader iterator draws its base seed and a RandomSampler its seed."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=gen))


def main_generator(seed: int | None, ntrain: int, nvalid: int, model=None) -> torch.Generator:
    """DeePMD-kit's main-process generator as its statistics begin (counts are DeePMD-kit systems: a mixed-type
    folder is one): seeded by the training DpLoaderSet (one base-seed draw per system), seeded again by the
    validation DpLoaderSet (one per system); then the model is built twice, the second time by deserialize with
    unseeded layers whose (overwritten) initial weights come from this generator.  The statistics' frames are
    drawn next (BatchSampler.statistics_frames), then the training batches.  The rebuild's draws are those of
    se_e2_a-style models (embedding and fitting nets); a descriptor with other parts (type embedding, attention)
    draws more there, and the sequence then differs."""
    gen = seeded_generator([0, (seed or 0) % 2**32])  # setup_seed([rank, seed]); rank 0 (single process)
    for _ in range(nvalid or ntrain):
        _draw(gen)
    if model is not None:
        fitting = set(model.fitting.modules())
        for mlp in (m for m in model.modules() if isinstance(m, MLP)):
            # a fitting net's output layer is rebuilt seeded
            for layer in list(mlp.layers)[:-1] if mlp in fitting else mlp.layers:
                for w in (layer.matrix, layer.bias, layer.idt):
                    if w is not None:
                        torch.empty(w.shape, dtype=w.dtype).normal_(generator=gen)
    return gen


class BatchSampler:
    def __init__(self, systems, batch_size, auto_prob: str, seed: int | None, world: int = 1,
                 sys_probs: list[float] | None = None, main: torch.Generator | None = None,
                 workers: int | None = None):
        """`main`: the main-process generator shared with the other loaders of the run (main_generator), by
        default one of these systems alone; `workers`: DeePMD-kit's loader workers (deepmd_loader_workers())."""
        # DeePMD-kit weighs DeePMD-kit systems: a mixed-type folder's parts (one per composition) are one, whose
        # batch size, batch count and probability are the folder's; each part is drawn by its share of the frames
        self.group = source_groups(systems)
        self.nframes = [s.nframes for s in systems]
        self.source_frames = [s.source_frames for s in systems]
        whole = [_Folder(systems[self.group.index(g)].natoms,
                         sum(nf for nf, h in zip(self.nframes, self.group) if h == g))
                 for g in range(self.group[-1] + 1)]
        self.group_frames = [w.nframes for w in whole]
        self.group_sizes = resolve_batch_sizes(batch_size, whole)
        self.sizes = [min(self.group_sizes[g], nf) for g, nf in zip(self.group, self.nframes)]
        self.world = world
        self.workers = deepmd_loader_workers() if workers is None else workers
        # batches per DeePMD-kit system as its DataLoader counts them (a last, short batch counts)
        self.batches = [math.ceil(nf / (bs * world)) for nf, bs in zip(self.group_frames, self.group_sizes)]
        self.group_probs = system_probabilities(auto_prob, self.batches, sys_probs)
        self.probs = torch.as_tensor([self.group_probs[g] * (nf / self.group_frames[g])
                                      for g, nf in zip(self.group, self.nframes)], dtype=torch.float64)
        self.main = main if main is not None else main_generator(seed, len(whole), 0)
        self.chosen = torch.zeros(0, dtype=torch.int64)  # this system-choosing epoch's systems
        self.used = 0                                     # how many of them were drawn
        self.loaders = [self._loader(None)] if self.workers == 0 else []
        self.last: tuple[int, list[int]] = (0, [])  # the last global batch: (system, frames), for messages

    def statistics_frames(self, nbatch: int) -> list[list[int]]:
        """The frames of each system that DeePMD-kit's statistics read (make_stat_input), drawn from the main
        generator where it does: per DeePMD-kit system an iterator (a base seed) whose RandomSampler draws a
        shuffle seed, then the first min(nbatch, its batches) batches of the shuffle, in order.  Data-parallel
        workers all read the same frames, those of the global batch (one process with that batch reads them too).
        A mixed-type folder's frames are numbered in the folder and handed to its parts."""
        picked: list[list[int]] = [[] for _ in self.nframes]
        for g, (nf, bs, batches) in enumerate(zip(self.group_frames, self.group_sizes, self.batches)):
            _draw(self.main)
            order = torch.randperm(nf, generator=torch.Generator().manual_seed(_draw(self.main)))
            owner = {}   # the folder's frame number -> (system, frame)
            for k in (k for k, h in enumerate(self.group) if h == g):
                numbers = range(self.nframes[k]) if self.source_frames[k] is None else self.source_frames[k]
                owner.update({int(n): (k, f) for f, n in enumerate(numbers)})
            for n in order[:min(nbatch, batches) * bs * self.world].tolist():
                k, f = owner[n]
                picked[k].append(f)
        return picked

    def _loader(self, gen: torch.Generator | None) -> dict:
        """A loader worker: its generator (None: the main one) and each system's shuffle (None: its iterator
        not read yet) and cursor."""
        return {"gen": gen, "order": [None] * len(self.nframes), "cursor": [0] * len(self.nframes)}

    def _frames(self, loader: dict, i: int, need: int) -> torch.Tensor:
        """The next `need` frames of system i from a loader worker; with one process at most the rest of the
        current shuffle (DeePMD-kit's short last batch), with several filled up from the next one."""
        gen = loader["gen"] if loader["gen"] is not None else self.main
        frames = []
        while need > 0:
            if loader["order"][i] is None or loader["cursor"][i] >= self.nframes[i]:
                if loader["order"][i] is not None:
                    _draw(gen)  # the exhausted iterator is replaced: the new one's base seed
                shuffle = torch.Generator().manual_seed(_draw(gen))
                loader["order"][i] = torch.randperm(self.nframes[i], generator=shuffle)
                loader["cursor"][i] = 0
            c = loader["cursor"][i]
            take = loader["order"][i][c:c + need]
            loader["cursor"][i] = c + take.numel()
            frames.append(take)
            need -= take.numel()
            if self.world == 1:
                break
        return torch.cat(frames)

    def next(self, rank: int = 0) -> tuple[int, torch.Tensor]:
        """(system index, frame indices) of this worker's share of the next global batch."""
        if self.used == len(self.chosen):   # a new system-choosing epoch: its iterator, workers and draws
            base = _draw(self.main)
            if self.workers > 0:
                self.loaders = [self._loader(torch.Generator().manual_seed(base + w)) for w in range(self.workers)]
            # one epoch: every system's batches, times the workers (deepmd/pt/utils/dataloader.py)
            self.chosen = torch.multinomial(self.probs, sum(self.batches) * max(self.workers, 1), True,
                                            generator=self.main)
            self.used = 0
        i = int(self.chosen[self.used])
        loader = self.loaders[self.used % len(self.loaders)]
        self.used += 1
        frames = self._frames(loader, i, self.sizes[i] * self.world)
        self.last = (i, frames.tolist())
        per = self.sizes[i]
        return i, frames[rank * per:(rank + 1) * per]

    def epoch_steps(self) -> int:
        """Steps of one epoch, as DeePMD-kit 3 counts them for numb_epoch (compute_total_numb_batch):
        ceil(max_i(batches_i / p_i)) over the DeePMD-kit systems drawn, batches_i = ceil(frames_i / global batch_i)."""
        probs = self.group_probs / float(np.sum(self.group_probs))
        drawn = probs > 0
        return int(np.ceil(np.max(np.asarray(self.batches, dtype=float)[drawn] / probs[drawn])))

    def state_dict(self) -> dict:
        """Everything the sequence depends on, the shared main generator included (plain tensors and lists)."""
        return {"nframes": list(self.nframes), "workers": self.workers, "main": self.main.get_state(),
                "chosen": self.chosen, "used": self.used,
                "loaders": [{"gen": None if ld["gen"] is None else ld["gen"].get_state(), "order": list(ld["order"]),
                             "cursor": list(ld["cursor"])} for ld in self.loaders]}

    def fits(self, state: dict) -> bool:
        """Whether a saved state was drawn over systems with these frame counts (and is of this format)."""
        return state.get("nframes") == self.nframes

    def load_state_dict(self, state: dict) -> None:
        self.workers = state["workers"]  # the run goes on as it began, whatever this machine's default
        self.main.set_state(state["main"])
        self.chosen, self.used = state["chosen"], state["used"]
        self.loaders = [{"gen": None if ld["gen"] is None else torch.Generator().set_state(ld["gen"]),
                         "order": list(ld["order"]), "cursor": list(ld["cursor"])} for ld in state["loaders"]]
