"""Statistics from training data that set a fresh model's normalisation and energy bias.

- The descriptor's environment-matrix mean/std (DeePMD-kit's EnvMatStatSe: number, sum and squared sum of the
  radial and angular entries over all `sel` slots per centre type, empty slots counting as zero rows; the angular
  mean is zero; a std below `protection` is raised to it), for every descriptor type, a hybrid's entries each.
- Per-type energy bias: least squares of frame energies on per-type atom counts.
- Mean and inverse standard deviation of each frame / atomic parameter (DeePMD-kit's fitting
  compute_input_stats: over the sampled frames, resp. their atoms; a std below `protection` is raised to it).

The trainer hands these the frames DeePMD-kit's statistics read (dpmd.train.sampler.BatchSampler.statistics_frames)
as subsets with max_frames=0 (every frame); max_frames > 0 takes frames spread evenly (stat_frames), as
refit_energy_bias (--finetune, `dpmd change-bias`) does.
"""

from __future__ import annotations

import numpy as np
import torch

from dpmd.geometry.graph import build_graph, edge_vectors


def stat_leaves(desc) -> list:
    """The descriptors that keep environment statistics: itself, or a hybrid's entries (recursively)."""
    return [leaf for sub in desc.descriptors for leaf in stat_leaves(sub)] if hasattr(desc, "entry_edges") else [desc]


def env_width(leaf) -> int:
    """Columns of a descriptor's environment matrix: 4 (s, s x/r, s y/r, s z/r), or 1 (s: se_e2_r)."""
    return leaf.mean.shape[-1]


def _leaf_edges(desc, edges) -> list:
    """(leaf, its edges) of one frame's (edge_vec, centre type, neighbour type): a hybrid's entry sees the edges
    within its own rcut."""
    if not hasattr(desc, "entry_edges"):
        return [(desc, edges)]
    out = []
    for i, sub in enumerate(desc.descriptors):
        keep = desc.entry_edges(i, edges[0])
        out += _leaf_edges(sub, tuple(e[keep] for e in edges))
    return out


@torch.no_grad()
def env_moments(model, systems, max_frames: int = 10) -> list[torch.Tensor]:
    """DeePMD-kit's raw environment statistics (EnvMatStatSe) of up to `max_frames` frames of each system, per
    leaf descriptor (stat_leaves): (ntypes, 2, 3), for the radial (r) and angular (a) entries of the centres of
    each type, the number, the sum and the squared sum over all nnei slots of every atom (empty slots and
    excluded pairs count as zeros; a one-column descriptor has no angular entries: zeros)."""
    leaves, nt = stat_leaves(model.descriptor), model.ntypes
    sums = [torch.zeros(nt, 4, dtype=torch.float64) for _ in leaves]  # sum r, r^2, a, a^2 per centre type
    atoms = torch.zeros(nt, dtype=torch.float64)
    for system in systems:
        for f in stat_frames(system.nframes, max_frames):
            graph = build_graph(system.coord[f], system.atype, None if system.box is None else system.box[f],
                                model.descriptor.rcut)
            at = graph["atype"]
            atoms += torch.bincount(at, minlength=nt).double()
            edges = (edge_vectors(graph).to(torch.float64), at.index_select(0, graph["center"]),
                     at.index_select(0, graph["neighbor"]))
            for total, (leaf, (vec, ct, nbr_type)) in zip(sums, _leaf_edges(model.descriptor, edges)):
                rows = leaf.env_rows(vec) if env_width(leaf) == 4 else leaf.env_values(vec).unsqueeze(1)
                rows = rows * leaf.kept_edges(rows, ct, nbr_type).unsqueeze(1)
                r, a = rows[:, 0], rows[:, 1:]
                total.index_add_(0, ct, torch.stack([r, r * r, a.sum(1), (a * a).sum(1)], 1))
    out = []
    for leaf, total in zip(leaves, sums):
        slots = atoms * leaf.nnei   # every slot counts, filled or not
        angular = 3 * slots if env_width(leaf) == 4 else torch.zeros_like(slots)
        out.append(torch.stack([torch.stack([slots, total[:, 0], total[:, 1]], 1),
                                torch.stack([angular, total[:, 2], total[:, 3]], 1)], 1))
    return out


@torch.no_grad()
def set_env_stats(leaf, moments: torch.Tensor, protection: float) -> None:
    """A leaf descriptor's mean / std from its moments (env_moments), DeePMD-kit's formula: the angular mean is
    zero; a type without atoms gets mean 0 and std 0.1; a std below `protection` is raised to it."""
    def std(number, total, squares):
        if not number:
            return 0.1
        return max(float(np.sqrt(max(squares / number - (total / number) * (total / number), 0.0))), protection)

    m = moments.double().tolist()
    mean, dev = np.zeros((leaf.ntypes, env_width(leaf))), np.zeros((leaf.ntypes, env_width(leaf)))
    for t in range(leaf.ntypes):
        number, total, _ = m[t][0]
        mean[t, 0] = total / number if number else 0.0
        dev[t] = std(*m[t][0])
        if env_width(leaf) == 4:
            dev[t, 1:] = std(*m[t][1])
    leaf.mean.copy_(torch.as_tensor(mean))
    leaf.std.copy_(torch.as_tensor(dev))


@torch.no_grad()
def descriptor_stats(model, systems, max_frames: int = 10, protection: float = 1e-2) -> list[torch.Tensor]:
    """Set the descriptor's statistics (mean/std) from up to `max_frames` frames of each system; returns the
    moments they came from (env_moments)."""
    present = np.zeros(model.ntypes, dtype=bool)
    for system in systems:
        present[np.asarray(system.atype)] = True
    if not present.all():
        missing = [model.type_map[t] for t in range(model.ntypes) if not present[t]]
        raise ValueError(f"no atoms of type(s) {missing} in the training data: cannot compute their statistics")
    moments = env_moments(model, systems, max_frames)
    for leaf, m in zip(stat_leaves(model.descriptor), moments):
        set_env_stats(leaf, m, protection)
    return moments


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
    """The frames of a system that the statistics above read when given all of a system: up to max_frames (0:
    all), evenly spread from the first (training passes DeePMD-kit's sampled frames with max_frames 0)."""
    step = max(1, nframes // max_frames) if max_frames else 1
    return range(0, nframes, step)[: max_frames or None]
