"""NVT (Langevin) MD of the example water box with a frozen dpmd model through ASE.

    python examples/water/ase_md.py runs/water/model.pth [steps]
"""

import sys
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from dpmd.calculator import DP
from dpmd.data import load_system

model = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
s = load_system(Path(__file__).parent / "data_0")
atoms = Atoms([s.type_map[t] for t in s.atype], positions=s.coord[0], cell=s.box[0], pbc=True)
atoms.calc = DP(model)
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, rng=np.random.default_rng(1))
dyn.attach(lambda: print(f"step {dyn.nsteps:5d}  epot {atoms.get_potential_energy():.4f} eV  "
                         f"T {atoms.get_temperature():.1f} K"), interval=20)
dyn.attach(lambda: write("water_md.extxyz", atoms, append=True), interval=20)
dyn.run(steps)
