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

    A model with frame / atomic parameters (numb_fparam, numb_aparam) takes them from the structure,
    atoms.info["fparam"] and atoms.arrays["aparam"] (or atoms.info["aparam"], where DeePMD-kit's calculator reads
    it), else from the calculator: DP(model, fparam=[...], aparam=[...]).  aparam: numb_aparam values for every
    atom, or one row per atom.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, device: str = "cpu", fparam=None, aparam=None, **kwargs):
        super().__init__(**kwargs)
        self.fparam, self.aparam = fparam, aparam
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

    @staticmethod
    def _atoms_params(atoms) -> dict:
        """The fparam / aparam that atoms carries itself (None where it has none)."""
        return {"fparam": atoms.info.get("fparam"),
                "aparam": atoms.arrays["aparam"] if "aparam" in atoms.arrays else atoms.info.get("aparam")}

    def _params(self, atoms) -> dict:
        """The structure's own fparam / aparam, else the calculator's; one line if the model needs one and has none."""
        params = {k: v if v is not None else getattr(self, k) for k, v in self._atoms_params(atoms).items()}
        has_default = self.model.fitting.default_fparam_tensor is not None
        for key, per, where in (("fparam", "frame", "info"), ("aparam", "atom", "arrays")):
            n = getattr(self.model, f"numb_{key}")
            if n and params[key] is None and not (key == "fparam" and has_default):
                raise DpmdError(f"the model takes {key} ({n} value(s) per {per}, numb_{key}): give DP(model, "
                                f"{key}=...) or atoms.{where}['{key}']")
        return params

    def check_state(self, atoms, tol=1e-15):
        """ASE's comparison, and a changed fparam / aparam of the structure (ASE compares neither)."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None:
            old, new = self._atoms_params(self.atoms), self._atoms_params(atoms)
            changes += [k for k in old if (old[k] is None) != (new[k] is None)
                        or (old[k] is not None and not np.array_equal(old[k], new[k]))]
        return changes

    def _check_geometry(self, positions: np.ndarray, cell: np.ndarray | None) -> None:
        """Non-finite coordinates or atoms on top of each other would give NaN or garbage: name the atoms."""
        from dpmd.data.system import MIN_PAIR_DISTANCE, find_close_pair

        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        if bad.size:
            raise DpmdError(f"atom {bad[0]} has a non-finite position {positions[bad[0]].tolist()}")
        if cell is not None and not np.isfinite(cell).all():
            raise DpmdError(f"the cell holds non-finite values {cell.tolist()}")
        if cell is not None and abs(np.linalg.det(cell)) < 1e-8:
            raise DpmdError(f"the cell {cell.tolist()} has volume 0; use pbc=False for a non-periodic system")
        pair = find_close_pair(positions[None], None if cell is None else cell[None])
        if pair is not None:
            _, i, j, dist, image = pair
            raise DpmdError(f"atoms {i} and {j} are {dist:.3g} Å apart{' (periodic image)' if image else ''}, "
                            f"closer than {MIN_PAIR_DISTANCE} Å (overlapping atoms)")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = atoms.get_pbc()
        if pbc.any() and not pbc.all():
            raise DpmdError(f"pbc={pbc.tolist()}: mixed periodicity is not supported; use all True or all False")
        periodic = bool(pbc.all())
        types = self._types(atoms)
        cell = np.asarray(atoms.cell, dtype=np.float64) if periodic else None
        energy, energies, forces, virial = 0.0, np.zeros(0), np.zeros((0, 3)), np.zeros((3, 3))
        if len(atoms):  # (no atoms: an empty sum, zero everything)
            self._check_geometry(np.asarray(atoms.positions, dtype=np.float64), cell)
            box = None if cell is None else torch.tensor(cell, device=self.device)
            coord = torch.tensor(atoms.positions, dtype=torch.float64, device=self.device)
            out = self.model(coord, types, box, **self._params(atoms))
            energy = float(out["energy"])
            energies = out["atom_energy"].detach().cpu().numpy()
            forces = out["force"].detach().cpu().numpy()
            virial = out["virial"].detach().cpu().numpy().reshape(3, 3)
            bad = np.flatnonzero(~(np.isfinite(energies) & np.isfinite(forces).all(axis=1)))
            if bad.size or not np.isfinite(energy):
                where = f"atom {bad[0]} ({atoms[bad[0]].symbol})" if bad.size else "the total energy"
                raise DpmdError(f"the model gives a non-finite energy or force at {where}")
        self.results.update(energy=energy, free_energy=energy, energies=energies, forces=forces)
        if periodic:  # ASE's sign: -virial / volume; no atoms, no stress
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume() if len(atoms) else virial)
        elif "stress" in properties:
            raise PropertyNotImplementedError("stress is undefined for a non-periodic system")
