"""DeepPot-SE: descriptor + per-type fitting net, built from DeePMD-kit's `model` config section."""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

from dpmd.errors import ConfigError
from dpmd.geometry.graph import build_graph
from dpmd.model.args import normalize_model_config
from dpmd.model.compress import check_graph
from dpmd.model.descriptor import build_descriptor, sections
from dpmd.model.fitting import EnergyFitting, group_by_type, in_type_order
from dpmd.model.forces import EdgeEnergyModel, evaluate
from dpmd.model.keys import DTYPES
from dpmd.ops import Backend


class DeepPot(EdgeEnergyModel, nn.Module):
    """Maps atomic environments to atomic energies; forces and virial come from dpmd.model.forces."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = normalize_model_config(config)
        f = cfg["fitting_net"]
        self.config = cfg
        self.type_map = list(cfg["type_map"])
        descriptor = copy.deepcopy(cfg["descriptor"])
        for section in sections(descriptor):  # as DeePMD-kit gives it (se_atten's use_econf_tebd reads it)
            section["type_map"] = self.type_map
        self.descriptor = build_descriptor(descriptor, len(self.type_map))
        self.fitting = EnergyFitting(len(self.type_map), self.descriptor.dim_out, f["neuron"], f["resnet_dt"],
                                     f["activation_function"], dtype=DTYPES[f["precision"]], seed=f["seed"],
                                     numb_fparam=f["numb_fparam"], numb_aparam=f["numb_aparam"],
                                     default_fparam=f["default_fparam"], mixed_types=self.descriptor.mixed_types)
        # trainable: false freezes the weights (a list, one entry per layer, freezes unless all are true)
        self.fitting.nets.requires_grad_(all(f["trainable"]) if isinstance(f["trainable"], list) else f["trainable"])
        if cfg["compress"] is not None:  # tabulated embeddings (dpmd.model.compress); the table comes with the weights
            self.descriptor.enable_compression(cfg["compress"], cfg["compress"]["check_frequency"])

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    @property
    def numb_fparam(self) -> int:
        return self.fitting.numb_fparam

    @property
    def numb_aparam(self) -> int:
        return self.fitting.numb_aparam

    def atomic_energy(self, edge_vec, center, center_type, neighbor_type, type_counts: Optional[List[int]] = None,
                      params: Optional[torch.Tensor] = None, backend: Optional[Backend] = None) -> torch.Tensor:
        """Atomic energies (n_centers,) of an edge list (dpmd.model.forces), or, with type_counts, of edges in
        DeePMD's padded layout with the centres grouped by type (the descriptor's forward with type_counts, where
        its `layouts` has "padded").  params: the centres' fparam and aparam (dpmd.geometry.graph.atom_params),
        for a model that takes them; backend: what runs (dpmd.ops.resolve; None: as the caller's context says).
        TorchScript-compatible: the frozen model (dpmd.model.export) runs this method as its own, on edge lists
        (the padded layout is eager only, and only some descriptors' forward takes type_counts)."""
        if type_counts is not None and not torch.jit.is_scripting():
            desc = self.descriptor(edge_vec, center, center_type, neighbor_type, backend, type_counts)
            return self.fitting(desc.to(self.fitting.energy_bias.dtype), center_type, type_counts, params)
        center, center_type, position = group_by_type(center, center_type)
        desc = self.descriptor(edge_vec, center, center_type, neighbor_type, backend)
        return self.fitting(desc.to(self.fitting.energy_bias.dtype), center_type, None,
                            in_type_order(params, position)).index_select(0, position)

    def graph_params(self, nframes: int, natoms: int, fparam=None, aparam=None) -> dict:
        """The graph entries fparam / aparam (dpmd.geometry.graph) of nframes frames of natoms atoms from what a
        caller gives (EnergyFitting.param_inputs: shapes, default_fparam, one-line errors); empty for a model
        without them."""
        bias = self.fitting.energy_bias  # (lists of Python floats would become float32 tensors by default)
        fp, ap = self.fitting.param_inputs(
            nframes, natoms, None if fparam is None else torch.as_tensor(fparam, dtype=bias.dtype, device=bias.device),
            None if aparam is None else torch.as_tensor(aparam, dtype=bias.dtype, device=bias.device))
        return {k: v for k, v in (("fparam", fp), ("aparam", ap)) if v is not None}

    def data_params(self, system, frames) -> dict:
        """The fparam / aparam arguments of some frames of a data system (dpmd.data.System), as far as this model
        takes them (a model without fparam ignores a system's fparam.npy)."""
        return {k: getattr(system, k)[frames] for k in ("fparam", "aparam")
                if getattr(self, f"numb_{k}") > 0 and getattr(system, k) is not None}

    def forward(self, coord, atype, box=None, neighbors=None, *, fparam=None, aparam=None, atom_virial=False,
                chunk_atoms=None) -> dict:
        """Energy, atomic energies, forces and virial of one frame (coord (N, 3)) or several (F, N, 3).
        fparam, aparam: the model's frame and atomic parameters (shapes: EnergyFitting.param_inputs).

        Returns a dict of tensors shaped like the input: energy (F,), atom_energy (F, N),
        force (F, N, 3), virial (F, 9) in DeePMD's row-major order, without the F axis
        for a single frame.
        """
        coord = torch.as_tensor(coord)
        single = coord.dim() == 2
        graph = build_graph(coord, atype, box, self.rcut, neighbors)
        graph.update(self.graph_params(graph["box"].shape[0], graph["natoms"], fparam, aparam))
        if self.descriptor.compressed:  # an edge beyond the tables: one line naming the atoms
            check_graph(self, graph)
        out = evaluate(self, graph, atom_virial=atom_virial, chunk_atoms=chunk_atoms)
        nf, n = graph["box"].shape[0], graph["natoms"]
        out["atom_energy"] = out["atom_energy"].reshape(nf, n)
        out["force"] = out["force"].reshape(nf, n, 3)
        out["virial"] = out["virial"].reshape(nf, 9)
        if atom_virial:
            out["atom_virial"] = out["atom_virial"].reshape(nf, n, 9)
        return {k: v[0] for k, v in out.items()} if single else out
