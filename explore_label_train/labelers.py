"""Labellers: one interface over any ASE calculator, run inside worker processes.

    labeller: {calculator: emt, kwargs: {}}            # ase.calculators.emt.EMT
    labeller: {calculator: lj, kwargs: {sigma: 2.3}}    # ase.calculators.lj.LennardJones
    labeller: {calculator: tblite, kwargs: {method: GFN2-xTB}}   # tblite (xTB), molecules and cells
    labeller: {calculator: pyscf, kwargs: {xc: pbe, basis: def2-svp}}   # PySCF DFT or HF, molecules
    labeller: {calculator: "package.module:Factory", kwargs: {...}}   # anything returning an ASE calculator

`label(payload)` returns energy (eV; the force-consistent free energy where the calculator gives one),
forces (eV/Å) and, for periodic cells when the calculator gives a stress, the virial (eV, DeePMD's sign:
-stress * volume).  payload["threads"], when given, is the labeller's OpenMP thread count (OMP_NUM_THREADS,
read when tblite's or PySCF's runtime loads: the first label in a spawned worker): the campaign splits its
cores among its local workers instead of each taking them all.
Any exception, non-finite result or missing property raises; the dispatcher turns that into a failed task
with the reason.
`check_label` is the campaign's check of a result before it becomes a label (shapes, finite values,
the sanity bounds in the campaign's filters).
This module imports no torch, so worker processes start quickly.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from dpmd.errors import ConfigError

BUILTIN = {
    "emt": ("ase.calculators.emt", "EMT"),
    "lj": ("ase.calculators.lj", "LennardJones"),
    "morse": ("ase.calculators.morse", "MorsePotential"),
    "tblite": ("explore_label_train.labelers", "TBLiteCalculator"),
    "xtb": ("explore_label_train.labelers", "TBLiteCalculator"),
    "pyscf": ("explore_label_train.labelers", "PySCFCalculator"),
}
REQUIRES = {"tblite": "tblite", "xtb": "tblite", "pyscf": "pyscf"}   # adapters defined here need these packages


def _factory(name: str):
    if name in BUILTIN:
        module, attr = BUILTIN[name]
    elif ":" in name:
        module, attr = name.split(":", 1)
    else:
        raise ConfigError(f"'labeller.calculator': unknown calculator {name!r}; valid: "
                          f"{', '.join(sorted(BUILTIN))}, or module:attr returning an ASE calculator")
    needed = REQUIRES.get(name, module)
    try:
        importlib.import_module(needed)
        mod = importlib.import_module(module)
    except ImportError as err:
        package = needed.split(".")[0] if name in BUILTIN else module
        raise ConfigError(f"'labeller.calculator' {name!r} needs {package}, "
                          f"which cannot be imported ({err})") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"'labeller.calculator' {name!r}: {module} has no attribute {attr!r}") from None


def check_labeller(lab: dict) -> None:
    """Validate the labeller up front (the calculator can be imported)."""
    _factory(lab["calculator"])


_CACHE: dict = {}
# A reused TBLite calculator carries state from one frame into the next even with cache_api False: the same frame
# labelled after another one differed by ~1e-8 eV (forces up to 1e-4 eV/Å), so labels depended on which frames a
# worker happened to label before and the demo did not repeat.  These get a fresh calculator for every frame.
FRESH = {"tblite", "xtb"}


def make_calculator(name: str, kwargs: dict):
    if name in FRESH:
        return _factory(name)(**kwargs)
    key = (name, repr(sorted(kwargs.items())))
    calc = _CACHE.get(key)
    if calc is None:
        calc = _CACHE[key] = _factory(name)(**kwargs)
    return calc


def TBLiteCalculator(method: str = "GFN2-xTB", **kwargs):
    """tblite's ASE calculator (GFN2-xTB by default), quiet, and with a fresh SCF start for every frame
    (cache_api False, and a new calculator per frame, FRESH: a label does not depend on which frame the worker
    labelled before).  SCF
    non-convergence raises CalculationFailed("SCF not converged in N cycles"): the task fails with it.
    kwargs: tblite.ase.TBLite's (accuracy, max_iterations, electronic_temperature, charge, ...)."""
    from tblite.ase import TBLite

    kwargs.setdefault("verbosity", 0)
    kwargs.setdefault("cache_api", False)
    return TBLite(method=method, **kwargs)


def label(payload: dict) -> dict:
    """payload: symbols, positions (N,3), cell (3,3) or None, calculator, kwargs."""
    from ase import Atoms

    if payload.get("threads"):
        os.environ["OMP_NUM_THREADS"] = str(payload["threads"])
    cell = payload.get("cell")
    atoms = Atoms(symbols=payload["symbols"], positions=np.asarray(payload["positions"], dtype=float),
                  cell=None if cell is None else np.asarray(cell, dtype=float), pbc=cell is not None)
    calc = make_calculator(payload["calculator"], payload.get("kwargs") or {})
    atoms.calc = calc
    energy = float(atoms.get_potential_energy())
    forces = np.asarray(atoms.get_forces(), dtype=float)
    # the force-consistent energy where the calculator has one (ASE's free_energy: with smearing, the Mermin free
    # energy whose derivatives the forces are; get_potential_energy(force_consistent=True) raises without it)
    free = (getattr(calc, "results", None) or {}).get("free_energy")
    if free is not None:
        energy = float(free)
    virial = None
    if cell is not None:
        try:
            stress = atoms.get_stress(voigt=False)
            virial = -np.asarray(stress, dtype=float) * atoms.get_volume()
        except Exception:  # PropertyNotImplementedError and friends: no virial for this labeller
            virial = None
    out = {"energy": energy, "forces": forces, "virial": virial}
    why = check_label(out, payload["symbols"])
    if why:
        raise ValueError(f"labeller returned {why}")
    return out


def check_label(value, symbols, bounds=None, reference=None):
    """Why a labeller's result must not become a label (None: it may).  Always checked: shapes and finite
    values.  With bounds (the campaign's filters): max_force (eV/Å, any atom's force) and
    max_energy_deviation (eV/atom away from `reference`, the median of the labels of the same composition)."""
    n = len(symbols)
    try:
        energy = float(value["energy"])
        forces = np.asarray(value["forces"], dtype=float)
        virial = None if value.get("virial") is None else np.asarray(value["virial"], dtype=float)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        return f"a malformed result ({type(err).__name__}: {err})"
    if forces.shape != (n, 3):
        return f"forces of shape {forces.shape}, expected ({n}, 3)"
    if virial is not None and virial.shape != (3, 3):
        return f"a virial of shape {virial.shape}, expected (3, 3)"
    if not np.isfinite(energy):
        return f"energy {energy}"
    bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
    if len(bad):
        return f"force {forces[bad[0]].tolist()} on atom {bad[0]} ({symbols[bad[0]]})"
    if virial is not None and not np.isfinite(virial).all():
        return f"a non-finite virial {virial.ravel().tolist()}"
    bounds = bounds or {}
    norms = np.linalg.norm(forces, axis=1)
    i = int(np.argmax(norms)) if n else 0
    if bounds.get("max_force") is not None and n and norms[i] > bounds["max_force"]:
        return f"force {norms[i]:.4g} eV/Å on atom {i} ({symbols[i]}), above filters.max_force {bounds['max_force']:g}"
    limit = bounds.get("max_energy_deviation")
    if limit is not None and reference is not None and n and abs(energy / n - reference) > limit:
        return (f"energy {energy / n:.6g} eV/atom, {energy / n - reference:+.4g} eV/atom from the median of this "
                f"composition's labels ({reference:.6g}), beyond filters.max_energy_deviation {limit:g}")
    return None


class SCFNotConverged(RuntimeError):
    """The labeller's self-consistent field did not converge: the frame gets no label."""


class PySCFCalculator(Calculator):
    """Energy and forces from PySCF (Kohn-Sham DFT, or Hartree-Fock with xc "hf") for molecules (open boundaries).

    kwargs: xc (a functional name, or "hf"), basis, charge, spin (2S), max_cycle, conv_tol.
    An SCF that has not converged after max_cycle cycles raises SCFNotConverged (never a label).
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, xc="pbe", basis="def2-svp", charge=0, spin=0, max_cycle=100, conv_tol=1e-9, **kw):
        super().__init__(**kw)
        self.settings = dict(xc=xc, basis=basis, charge=charge, spin=spin, max_cycle=max_cycle, conv_tol=conv_tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from pyscf import dft, gto, scf

        s = self.settings
        if self.atoms.pbc.any():
            raise ValueError("the pyscf labeller handles molecules only (open boundaries)")
        mol = gto.M(atom=[(a.symbol, tuple(a.position)) for a in self.atoms], basis=s["basis"],
                    charge=s["charge"], spin=s["spin"], unit="Angstrom", verbose=0)
        if str(s["xc"]).lower() == "hf":
            mf = scf.RHF(mol) if s["spin"] == 0 else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if s["spin"] == 0 else dft.UKS(mol)
            mf.xc = s["xc"]
        mf.max_cycle, mf.conv_tol = s["max_cycle"], s["conv_tol"]
        e = mf.kernel()
        if not mf.converged:
            raise SCFNotConverged(f"SCF not converged in {s['max_cycle']} cycles (pyscf {s['xc']}/{s['basis']})")
        grad = mf.nuc_grad_method().kernel()
        self.results["energy"] = float(e) * Hartree
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = -np.asarray(grad) * Hartree / Bohr
