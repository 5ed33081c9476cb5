"""Statistics from training data that set a fresh model's normalisation and energy bias.

- Environment-matrix mean/std per centre type (DeePMD-kit's definition: averages over all
  `sel` slots, empty slots counting as zero rows; the angular mean is zero; a std below
  `protection` is raised to it).
- Per-type energy bias: least squares of frame energies on per-type atom counts.
- Mean and inverse standard deviation of each frame / atomic parameter (DeePMD-kit's fitting
  compute_input_stats: over the sampled frames, resp. their atoms; a std below `protection` is raised to it).
"""

from __future__ import annotations

import numpy as np
import torch

from dpmd.geometry.graph import build_graph, edge_vectors


def _frames(systems, max_frames: int):
    for system in systems:
        step = max(1, system.nframes // max_frames) if max_frames else 1
        for f in range(0, system.nframes, step)[: max_frames or None]:
            box = None if system.box is None else system.box[f]
            yield system.coord[f], system.atype, box


@torch.no_grad()
def descriptor_stats(model, systems, max_frames: int = 10, protection: float = 1e-2):
    """Set model.descriptor.mean/std from up to `max_frames` frames of each system."""
    desc = model.descriptor
    nt = model.ntypes
    sums = np.zeros((nt, 4))  # sum r, sum r^2, sum a, sum a^2 per centre type
    count = np.zeros(nt)
    for coord, atype, box in _frames(systems, max_frames):
        graph = build_graph(coord, atype, box, desc.rcut)
        rows = desc.env_rows(edge_vectors(graph)).double()
        ct = graph["atype"][graph["center"]]
        # excluded pairs count as empty slots (zero rows), as in DeePMD-kit's statistics
        rows = rows * desc.kept_edges(rows, ct, graph["atype"][graph["neighbor"]]).unsqueeze(1)
        for t in range(nt):
            r = rows[ct == t]
            sums[t] += [r[:, 0].sum(), (r[:, 0] ** 2).sum(), r[:, 1:].sum(), (r[:, 1:] ** 2).sum()]
        count += np.bincount(graph["atype"].numpy(), minlength=nt) * desc.nnei
    if not count.all():
        missing = [model.type_map[t] for t in range(nt) if count[t] == 0]
        raise ValueError(f"no atoms of type(s) {missing} in the training data: cannot compute their statistics")
    mean_r = sums[:, 0] / count
    std_r = np.sqrt(np.maximum(sums[:, 1] / count - mean_r ** 2, 0.0))
    mean_a = sums[:, 2] / (3 * count)
    std_a = np.sqrt(np.maximum(sums[:, 3] / (3 * count) - mean_a ** 2, 0.0))
    mean = np.zeros((nt, 4))
    mean[:, 0] = mean_r
    std = np.stack([std_r, std_a, std_a, std_a], axis=1)
    std[std < protection] = protection
    desc.mean.copy_(torch.as_tensor(mean))
    desc.std.copy_(torch.as_tensor(std))


@torch.no_grad()
def energy_bias(model, systems, rcond=None) -> np.ndarray:
    """Set model.fitting.energy_bias by least squares of frame energies on type counts."""
    nt = model.ntypes
    counts, energies = [], []
    for system in systems:
        if system.energy is None:
            continue
        n = np.bincount(system.atype, minlength=nt)
        counts.append(np.repeat(n[None, :], system.nframes, axis=0))
        energies.append(system.energy)
    if not counts:
        raise ValueError("no energies in the training data: cannot fit the energy bias")
    bias = np.linalg.lstsq(np.concatenate(counts).astype(float), np.concatenate(energies), rcond=rcond)[0]
    model.fitting.energy_bias.copy_(torch.as_tensor(bias))
    return bias


@torch.no_grad()
def param_stats(model, systems, max_frames: int = 10, protection: float = 1e-2) -> None:
    """Set model.fitting's fparam_avg / fparam_inv_std and aparam_avg / aparam_inv_std from up to `max_frames`
    frames of each system that holds them (systems without fparam.npy use default_fparam and are left out, as
    in DeePMD-kit; with no data at all the normalisation stays the identity)."""
    fitting = model.fitting
    for key, width in (("fparam", fitting.numb_fparam), ("aparam", fitting.numb_aparam)):
        values = [getattr(s, key)[stat_frames(s.nframes, max_frames)].reshape(-1, width) for s in systems
                  if width and getattr(s, key) is not None]
        if not values:
            continue
        v = np.concatenate(values)
        mean = v.mean(axis=0)
        std = np.sqrt(np.maximum((v * v).mean(axis=0) - mean * mean, 0.0))
        std[std < protection] = protection
        getattr(fitting, f"{key}_avg").copy_(torch.as_tensor(mean))
        getattr(fitting, f"{key}_inv_std").copy_(torch.as_tensor(1.0 / std))


def init_from_data(model, systems, max_frames: int = 10, protection: float = 1e-2) -> None:
    descriptor_stats(model, systems, max_frames, protection)
    param_stats(model, systems, max_frames, protection)
    energy_bias(model, systems)


@torch.no_grad()
def refit_energy_bias(model, systems, max_frames: int = 10) -> np.ndarray:
    """Fine-tuning: shift the energy bias so the model's energies fit the new data (DeePMD's
    change-by-statistic): bias += least squares of (label - prediction) on per-type counts."""
    nt = model.ntypes
    counts, residuals = [], []
    for system in systems:
        if system.energy is None:
            continue
        step = max(1, system.nframes // max_frames)
        frames = list(range(0, system.nframes, step))[:max_frames]
        box = None if system.box is None else torch.as_tensor(system.box[frames])
        pred = model(torch.as_tensor(system.coord[frames]), torch.as_tensor(system.atype), box,
                     **model.data_params(system, frames))["energy"]
        residuals.append(system.energy[frames] - pred.double().numpy())
        counts.append(np.repeat(np.bincount(system.atype, minlength=nt)[None, :], len(frames), axis=0))
    if not counts:
        raise ValueError("no energies in the fine-tuning data: cannot re-fit the energy bias")
    delta = np.linalg.lstsq(np.concatenate(counts).astype(float), np.concatenate(residuals), rcond=None)[0]
    model.fitting.energy_bias.add_(torch.as_tensor(delta, dtype=model.fitting.energy_bias.dtype))
    return delta


def stat_frames(nframes: int, max_frames: int) -> range:
    """The frames of a system that the statistics above read: up to max_frames (0: all), evenly spread from
    the first (the rule of _frames and refit_energy_bias)."""
    step = max(1, nframes // max_frames) if max_frames else 1
    return range(0, nframes, step)[: max_frames or None]
