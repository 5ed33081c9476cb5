"""ASE calculator: `atoms.calc = DP("model.pth")`."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from dpmd.errors import DpmdError


class DP(Calculator):
    """Energy, forces and stress from a dpmd model (a path to a model file, or an in-memory DeepPot).

    Atoms are mapped onto the model's type_map by chemical symbol.  Fully periodic or fully
    open boundaries; stress (ASE's sign: -virial / volume) only for periodic cells.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, torch.nn.Module):
            from dpmd.model.io import load_model

            model = load_model(model, device=device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self._type_of = {name: t for t, name in enumerate(model.type_map)}

    def _types(self, atoms) -> torch.Tensor:
        symbols = atoms.get_chemical_symbols()
        try:
            return torch.tensor([self._type_of[s] for s in symbols], device=self.device)
        except KeyError:
            i = next(i for i, s in enumerate(symbols) if s not in self._type_of)
            raise DpmdError(f"atom {i} is {symbols[i]}, which is not in the model's type_map "
                            f"{self.model.type_map}") from None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = atoms.get_pbc()
        if pbc.any() and not pbc.all():
            raise DpmdError(f"pbc={pbc.tolist()}: mixed periodicity is not supported; use all True or all False")
        periodic = bool(pbc.all())
        box = torch.tensor(np.asarray(atoms.cell), dtype=torch.float64, device=self.device) if periodic else None
        coord = torch.tensor(atoms.positions, dtype=torch.float64, device=self.device)
        out = self.model(coord, self._types(atoms), box)
        energy = float(out["energy"])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["atom_energy"].detach().cpu().numpy()
        self.results["forces"] = out["force"].detach().cpu().numpy()
        if periodic:
            virial = out["virial"].detach().cpu().numpy().reshape(3, 3)
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())
        elif "stress" in properties:
            raise PropertyNotImplementedError("stress is undefined for a non-periodic system")
