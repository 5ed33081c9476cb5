"""MD state: every quantity is a torch tensor on the model's device, with a leading frame axis.

Several independent systems of equal atom count advance together (F frames of N atoms);
a single system is F = 1.  Positions are kept unwrapped (never folded into the box).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from dpmd.md.units import BOLTZ, MVV2E


@dataclass
class MDState:
    positions: torch.Tensor        # (F, N, 3) Å, unwrapped
    velocities: torch.Tensor       # (F, N, 3) Å/ps
    masses: torch.Tensor           # (F, N) amu
    atype: torch.Tensor            # (F, N) type index into the driving model's type_map
    box: torch.Tensor | None       # (F, 3, 3) lattice vectors as rows, or None (open boundaries)
    forces: torch.Tensor | None = None      # (F, N, 3) eV/Å
    energy: torch.Tensor | None = None      # (F,) eV
    virial: torch.Tensor | None = None      # (F, 3, 3) eV, DeePMD sign (-dE/dstrain)
    step: int = 0
    # energy given to the system by thermostat/barostat (F,), so that pe + ke - ext_work (+ the
    # extended-variable energies) is the conserved quantity
    ext_work: torch.Tensor | None = None
    thermostat: dict = field(default_factory=dict)   # name -> tensor
    barostat: dict = field(default_factory=dict)
    rng: torch.Generator | None = None

    @property
    def nframes(self) -> int:
        return self.positions.shape[0]

    @property
    def natoms(self) -> int:
        return self.positions.shape[1]

    @property
    def dof(self) -> int:
        """Degrees of freedom per frame: 3N - 3 (total momentum is zero and stays zero)."""
        return max(3 * self.natoms - 3, 1)

    def allsum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks holding parts of this state: x itself here (MPI: dpmd.md.parallel)."""
        return x

    def atom_noise(self) -> torch.Tensor:
        """(F, N, 3) standard normal numbers, a triple per atom, from the run's generator (MPI draws every atom's
        in global order and keeps its own rows, so it draws what the serial run draws: dpmd.md.parallel)."""
        v = self.velocities
        return torch.randn(v.shape, generator=self.rng, dtype=v.dtype, device=v.device)

    def tensors(self) -> dict:
        """Everything needed to continue the run, as plain tensors (for checkpoints)."""
        return {"positions": self.positions, "velocities": self.velocities, "masses": self.masses,
                "atype": self.atype, "box": self.box, "forces": self.forces, "energy": self.energy,
                "virial": self.virial, "step": self.step, "ext_work": self.ext_work,
                "thermostat": dict(self.thermostat), "barostat": dict(self.barostat),
                "rng_state": None if self.rng is None else self.rng.get_state().cpu(),
                "rng_device": None if self.rng is None else self.rng.device.type}

    @classmethod
    def from_tensors(cls, d: dict, device) -> "MDState":
        to = (lambda t: None if t is None else t.to(device))
        return cls(positions=to(d["positions"]), velocities=to(d["velocities"]), masses=to(d["masses"]),
                   atype=to(d["atype"]), box=to(d["box"]), forces=to(d["forces"]), energy=to(d["energy"]),
                   virial=to(d["virial"]), step=int(d["step"]), ext_work=to(d["ext_work"]),
                   thermostat={k: to(v) for k, v in d["thermostat"].items()},
                   barostat={k: to(v) for k, v in d["barostat"].items()},
                   rng=restore_generator(d["rng_state"], d.get("rng_device"), device))


def restore_generator(saved: torch.Tensor | None, saved_on: str | None, device) -> torch.Generator:
    """A generator on `device` that continues the saved one (a CPU byte tensor of Generator.get_state()).

    The host and CUDA generators are different algorithms (Mersenne twister, Philox) with states of different
    sizes, so a checkpoint restarted on the other kind of device cannot continue its random stream: the new
    generator is seeded from the saved state instead (the same checkpoint always restarts the same way).
    saved_on: the device type the state came from (None, checkpoints before it was kept: this device's)."""
    rng = torch.Generator(device=device)
    if saved is None:
        return rng
    saved = saved.detach().to("cpu", torch.uint8)
    if saved_on in (None, rng.device.type) and saved.numel() == rng.get_state().numel():
        rng.set_state(saved)
    else:
        rng.manual_seed(int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little"))
    return rng


def kinetic_energy(state: MDState) -> torch.Tensor:
    """(F,) eV."""
    return state.allsum(0.5 * MVV2E * (state.masses.unsqueeze(-1) * state.velocities ** 2).sum(dim=(1, 2)))


def kinetic_tensor(state: MDState) -> torch.Tensor:
    """(F, 3, 3) sum_i m_i v_i (x) v_i in eV."""
    mv = state.masses.unsqueeze(-1) * state.velocities
    return state.allsum(MVV2E * torch.einsum("fni,fnj->fij", mv, state.velocities))


def temperature(state: MDState) -> torch.Tensor:
    return 2.0 * kinetic_energy(state) / (state.dof * BOLTZ)


def per_frame(x, state: MDState) -> torch.Tensor:
    """A number, or a tensor of one value per frame, as an (F,) tensor on the state's device.  A number is
    filled in on the device (a tensor made from host data would be a copy the host waits for, on a GPU)."""
    if torch.is_tensor(x):
        return x.to(device=state.positions.device, dtype=state.positions.dtype).expand(state.nframes)
    return torch.full((state.nframes,), float(x), dtype=state.positions.dtype, device=state.positions.device)


def frame_boxes(state: MDState) -> torch.Tensor:
    """(F, 3, 3) the boxes, zeros for open boundaries (the model's graph takes a box per frame)."""
    if state.box is not None:
        return state.box
    return torch.zeros(state.nframes, 3, 3, dtype=state.positions.dtype, device=state.positions.device)


def volume(state: MDState) -> torch.Tensor:
    if state.box is None:
        return torch.zeros(state.nframes, dtype=state.positions.dtype, device=state.positions.device)
    return torch.linalg.det(state.box).abs()


def remove_com_velocity(velocities: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    m = masses.unsqueeze(-1)
    return velocities - (m * velocities).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True)


def maxwell_boltzmann(masses: torch.Tensor, temp: float, rng: torch.Generator, dof: int) -> torch.Tensor:
    """Velocities (F, N, 3) drawn at `temp`, zero total momentum, rescaled to exactly `temp` (LAMMPS-like)."""
    sigma = torch.sqrt(BOLTZ * temp / (masses * MVV2E)).unsqueeze(-1)
    v = sigma * torch.randn(masses.shape + (3,), generator=rng, dtype=masses.dtype, device=masses.device)
    v = remove_com_velocity(v, masses)
    if temp > 0:
        ke = 0.5 * MVV2E * (masses.unsqueeze(-1) * v ** 2).sum(dim=(1, 2))
        v = v * torch.sqrt(0.5 * dof * BOLTZ * temp / ke).view(-1, 1, 1)
    return v
