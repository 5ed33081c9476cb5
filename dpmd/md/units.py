"""LAMMPS "metal" units: eV, Å, ps, amu, K, bar (the constants LAMMPS uses)."""

BOLTZ = 8.617343e-5          # eV/K
MVV2E = 1.0364269e-4         # amu Å²/ps² -> eV
FTM2V = 1.0 / MVV2E          # eV/(Å amu) -> Å/ps²
NKTV2P = 1.6021765e6         # eV/Å³ -> bar
FS = 1.0e-3                  # fs -> ps
