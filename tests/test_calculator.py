"""The ASE calculator returns the model's numbers and drives ASE's integrators."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.md.verlet import VelocityVerlet

from dpmd.calculator import DP
from dpmd.errors import DpmdError
from dpmd.model import save_model
from tests.conftest import triclinic_water


def to_atoms(coord, atype, box, pbc=True):
    return Atoms(symbols=["O" if t == 0 else "H" for t in atype.tolist()], positions=coord.numpy(),
                 cell=box.numpy() if box is not None else None, pbc=pbc)


def test_calculator_matches_model(model, water):
    coord, atype, box = triclinic_water(water)
    atoms = to_atoms(coord, atype, box)
    atoms.calc = DP(model)
    out = model(coord, atype, box)
    assert atoms.get_potential_energy() == pytest.approx(float(out["energy"]), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), out["force"].numpy(), atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies(), out["atom_energy"].numpy(), atol=1e-12)
    # stress is ASE's: dE/d(strain) / V, checked against ASE's own finite differences
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-6), atol=1e-7)


def test_open_boundaries_and_model_file(model, water, tmp_path):
    coord, atype, _ = triclinic_water(water)
    save_model(model, tmp_path / "m.pth")
    atoms = to_atoms(coord, atype, None, pbc=False)
    atoms.calc = DP(str(tmp_path / "m.pth"))
    assert atoms.get_potential_energy() == pytest.approx(float(model(coord, atype)["energy"]), abs=1e-10)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_nve_with_ase_conserves_energy(model, water):
    coord, atype, box = triclinic_water(water)
    atoms = to_atoms(coord, atype, box)
    atoms.calc = DP(model)
    atoms.set_velocities(np.random.default_rng(0).normal(scale=0.01, size=(len(atoms), 3)))
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    e0 = atoms.get_total_energy()
    dyn.run(20)
    assert abs(atoms.get_total_energy() - e0) / len(atoms) < 1e-4


def test_errors(model, water):
    coord, atype, box = triclinic_water(water)
    atoms = to_atoms(coord, atype, box)
    atoms[3].symbol = "C"
    atoms.calc = DP(model)
    with pytest.raises(DpmdError, match=r"atom 3 is C, which is not in the model's type_map \['O', 'H'\]"):
        atoms.get_potential_energy()
    atoms = to_atoms(coord, atype, box)
    atoms.pbc = [True, True, False]
    atoms.calc = DP(model)
    with pytest.raises(DpmdError, match="mixed periodicity"):
        atoms.get_potential_energy()
