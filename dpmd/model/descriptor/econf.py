"""Electronic configurations of the elements: DeePMD-kit's `use_econf_tebd` type-embedding input, computed.

A neutral atom's ground state fills the subshells in Madelung's order (n + l, then n), apart from the known
exceptions (EXCEPTIONS: electrons moved from one subshell to another, those of `mendeleev`, which DeePMD-kit's
table was made from); within a subshell, Hund's rule: each orbital takes one electron before any takes a second.
DeePMD-kit's vector (deepmd/utils/econf_embd.py) lists the orbitals of SUBSHELLS in that order, each as its
occupation in spin form (empty (-1, -1), one electron (-1, 1), two (1, 1)), all 118 numbers scaled by
1/sqrt(118).  These vectors equal DeePMD-kit 3.2's for all 118 elements (checked once, offline).
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from dpmd.errors import ConfigError

ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu "
    "Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr "
    "Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()

LETTERS = "spdf"
# DeePMD-kit's slot layout: these subshells in this order, 2l + 1 orbitals each (59 orbitals, 118 numbers)
SUBSHELLS = ("1s 2s 2p 3s 3p 3d 4s 4p 4d 4f 5s 5p 5d 5f 6s 6p 6d 7s 7p").split()
ECONF_DIM = 2 * sum(2 * LETTERS.index(s[1]) + 1 for s in SUBSHELLS)

# ground states that leave Madelung's order: (from, to, electrons) -> the elements
EXCEPTIONS = {
    ("4s", "3d", 1): "Cr Cu",              # half-filled and filled d shells
    ("5s", "4d", 1): "Nb Mo Ru Rh Ag",
    ("5s", "4d", 2): "Pd",
    ("6s", "5d", 1): "Pt Au",
    ("7s", "6d", 1): "Ds Rg",
    ("4f", "5d", 1): "La Ce Gd",           # a 5d electron instead of a 4f one (Gd: a half-filled 4f)
    ("5f", "6d", 1): "Ac Pa U Np Cm",
    ("5f", "6d", 2): "Th",
}  # (mendeleev 1.3.0 also moves Lr's 6d electron to 7p; DeePMD-kit's table keeps 6d1, and so does dpmd)


def madelung_order() -> List[str]:
    """Subshells in filling order: by n + l, then by n."""
    shells = [(n, l) for n in range(1, 8) for l in range(min(n, len(LETTERS)))]
    return [f"{n}{LETTERS[l]}" for n, l in sorted(shells, key=lambda s: (s[0] + s[1], s[0]))]


def configuration(symbol: str) -> Dict[str, int]:
    """Electrons per subshell of the neutral atom's ground state, e.g. Cu: {..., '4s': 1, '3d': 10}."""
    left = ELEMENTS.index(symbol) + 1
    occupied: Dict[str, int] = {}
    for shell in madelung_order():
        if left == 0:
            break
        occupied[shell] = min(left, 2 * (2 * LETTERS.index(shell[1]) + 1))
        left -= occupied[shell]
    for (source, target, moved), symbols in EXCEPTIONS.items():
        if symbol in symbols.split():
            occupied[source] -= moved
            occupied[target] = occupied.get(target, 0) + moved
    return {shell: count for shell, count in occupied.items() if count}


def orbital_occupations(symbol: str) -> List[int]:
    """0, 1 or 2 electrons in each orbital of SUBSHELLS (Hund's rule: doubly occupied orbitals first, then the
    singly occupied ones, as DeePMD-kit lists mendeleev's pairs and unpaired electrons)."""
    occupied = configuration(symbol)
    out: List[int] = []
    for shell in SUBSHELLS:
        orbitals, count = 2 * LETTERS.index(shell[1]) + 1, occupied.get(shell, 0)
        pairs = max(0, count - orbitals)
        single = count - 2 * pairs
        out += [2] * pairs + [1] * single + [0] * (orbitals - pairs - single)
    return out


def econf_vector(symbol: str) -> List[float]:
    """DeePMD-kit's normalised configuration vector (ECONF_DIM numbers) of an element."""
    spins = {0: (-1, -1), 1: (-1, 1), 2: (1, 1)}
    scale = 1.0 / math.sqrt(ECONF_DIM)
    return [scale * v for n in orbital_occupations(symbol) for v in spins[n]]


def check_elements(type_map: List[str]) -> None:
    """A type that is not an element: a one-line ConfigError."""
    for name in type_map:
        if name not in ELEMENTS:
            raise ConfigError(f"'model.descriptor.use_econf_tebd': type_map entry {name!r} is not an element "
                              f"(expected element symbols, H to Og, e.g. O, H, Cu)")


def econf_matrix(type_map: List[str], dtype=torch.float64) -> torch.Tensor:
    """(ntypes, ECONF_DIM): each type's vector (check_elements first)."""
    check_elements(type_map)
    return torch.tensor([econf_vector(name) for name in type_map], dtype=dtype)

