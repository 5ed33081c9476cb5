"""MPI runs of `dpmd md`: `mpiexec -n N dpmd md input.yaml` (mpi4py; `pip install dpmd[mpi]`).

ParallelSimulation is the serial Simulation with the per-atom arrays distributed by dpmd.md.domain and
its own force provider (DomainForces): each rank holds the atoms of its brick (sorted by global id),
evaluates the model on them with their ghosts, and sends ghost forces back.  Everything else is the
serial code:

- thermostats and the barostat are the serial ones: their sums over atoms go through
  `MDState.allsum`, which sums over ranks for a DistributedState, and every random number is drawn on
  every rank from one replicated generator, in the serial order (Langevin's noise comes from
  `atom_noise`: all N atoms' in global-id order, each rank keeping its own rows), so a run follows the
  serial trajectory to round-off whatever the number of ranks;
- thermo, model deviation and trajectory frames are global (sums over ranks, forces gathered);
  rank 0 writes every file; a safety stop is found on every rank and has the serial run's message;
- checkpoints hold global arrays in global-id order: the serial format, so a checkpoint written with
  N ranks restarts with M ranks (or serially), and vice versa.

Only one system per run (a batch of systems runs serially), and the cell must be periodic.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import numpy as np
import torch

from dpmd.errors import DpmdError, NeighborOverflowError
from dpmd.geometry.neighbor import (NeighborList, count_neighbors, first_over_sel, sel_group_name,
                                    sel_overflow_message)
from dpmd.md import devi as devi_mod
from dpmd.md.domain import Comm, Domain
from dpmd.md.engine import Simulation
from dpmd.md.provider import ForceProvider
from dpmd.md.safety import Safety
from dpmd.md.state import MDState
from dpmd.model.forces import assemble, evaluate

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def mpi_world():
    """COMM_WORLD when this process was started by mpiexec with more than one rank, else None.

    mpi4py is imported only then, so serial runs never initialise MPI."""
    size = next((os.environ[k] for k in _SIZE_VARIABLES if k in os.environ), None)
    try:
        if size is None or int(size) <= 1:
            return None
    except ValueError:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise DpmdError(f"started with {size} MPI ranks but mpi4py is not installed: pip install 'dpmd[mpi]'") from None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def rank_device(device: str, comm) -> str:
    """The device of this rank: `cuda` (no index) under MPI is the node-local rank's GPU (round robin over the
    GPUs this process sees), so that N ranks per node share N GPUs; anything else is kept as given."""
    if comm is None or device != "cuda":
        return device
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return f"cuda:{local % max(torch.cuda.device_count(), 1)}"


@dataclass
class DistributedState(MDState):
    """An MDState holding this rank's atoms only (F = 1); energy, virial, box, thermostat and barostat
    variables and the RNG are replicated on every rank."""

    gid: torch.Tensor | None = None       # (n_local,) global atom ids, ascending
    natoms_global: int = 0
    comm: Comm | None = None

    @property
    def dof(self) -> int:
        return max(3 * self.natoms_global - 3, 1)

    def allsum(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.allsum(x)

    def atom_noise(self) -> torch.Tensor:
        """The serial run's numbers: every atom's drawn in global-id order, this rank's rows kept."""
        v = self.velocities
        return torch.randn((self.nframes, self.natoms_global, 3), generator=self.rng, dtype=v.dtype,
                           device=v.device)[:, self.gid]


class DomainForces(ForceProvider):
    """The MPI force provider: model k on this rank's atoms and their ghosts (dpmd.md.domain), forces on ghosts
    sent back to their owners, energy, virial and the safety findings summed over the ranks (so every rank
    stops at the same step with the same message).  atypes: per model, the (N,) types in global-id order."""

    def __init__(self, models: list, params: list, atypes: list, masses: torch.Tensor, domain: Domain,
                 safety: Safety):
        self.models, self.params, self.atypes, self.masses = models, params, atypes, masses
        self.domain, self.comm, self.safety = domain, domain.comm, safety
        self.ghost_x = None   # the ghosts' positions at the last evaluation

    def reset(self) -> None:
        self.domain.frames = None
        self.ghost_x = None

    def coords(self, state: DistributedState) -> torch.Tensor:
        """Local atoms then ghost slots."""
        if self.ghost_x is None:
            self.ghost_x = self.domain.forward(state.positions[0])
        return torch.cat([state.positions[0], self.ghost_x])

    def __call__(self, state: DistributedState) -> DistributedState:
        dom = self.domain
        x, box = state.positions[0], state.box[0]
        finite = torch.isfinite(x).all(dim=-1)
        nbad = int((~finite).sum())
        disp = dom.local_displacement(x, box) if nbad == 0 else 0.0
        flags = self.comm.allmax(np.array([float(nbad > 0), disp]))
        if flags[0] > 0:
            bad = sorted(i for part in self.comm.allgather(state.gid[~finite].tolist()) for i in part)
            self.safety.lost_atoms(state.step, [(0, i) for i in bad])
        if dom.needs_rebuild(float(flags[1]), box):
            gid, pos, vel = dom.rebuild(state.gid, x, state.velocities[0], box)
            state.gid, state.positions, state.velocities = gid, pos.unsqueeze(0), vel.unsqueeze(0)
            state.masses = self.masses[gid].unsqueeze(0)
            state.atype = self.atypes[0][gid].unsqueeze(0)
            self.ghost_x = dom.ghost_positions
        else:
            self.ghost_x = dom.forward(x)
        try:
            out = self.evaluate(0, self.coords(state), box, state.gid, stops=True)
        except NeighborOverflowError as err:
            self.safety.overflow(state.step, err)
        state.forces = out["force"].unsqueeze(0)
        state.energy = out["energy"]
        state.virial = out["virial"]
        if "close" in out:
            self.safety.too_close(state.step, [(0, i, j, d) for i, j, _, d in out["close"]])
        if not bool(torch.isfinite(state.energy).all()):   # (the same on every rank: a sum over them)
            bad = ~torch.isfinite(out["force"]).all(-1) | ~torch.isfinite(out["atom_energy"])
            atoms = sorted(i for part in self.comm.allgather(state.gid[bad].tolist()) for i in part)
            self.safety.bad_energy(state.step, [(0, i) for i in atoms])
        return state

    def evaluate(self, k: int, coord: torch.Tensor, box: torch.Tensor, gid: torch.Tensor, stops: bool = False):
        """Model k on local atoms + ghosts: global energy (1,), virial (1, 3, 3), local forces (n, 3) and atomic
        energies (n,); with stops, the close pairs ("close": (i, j, shift, d) in global ids, i <= j, when there are
        any).  Neighbour overflow is the model's NeighborOverflowError, on every rank.  Collective."""
        model, dom = self.models[k], self.domain
        nlocal = gid.numel()
        e_count = dom.center.numel()
        vec = coord[dom.neighbor] - coord[dom.center] + torch.einsum(
            "ei,eij->ej", dom.shift, box.unsqueeze(0)[torch.zeros(e_count, dtype=torch.long, device=box.device)])
        d2 = (vec * vec).sum(-1)
        mask = d2 < float(model.rcut) ** 2
        center, neighbor, vec = dom.center[mask], dom.neighbor[mask], vec[mask]
        atype = torch.cat([self.atypes[k][gid], self.atypes[k][dom.ghost_gid]])
        counts = count_neighbors(NeighborList(center, neighbor, None), atype, model.ntypes, nlocal)
        # [entry, atom, sel group, count, atoms over] of the first overflow: the model's sel (entry -1), else a
        # hybrid's descriptors' own sel within their own rcut
        found = first_over_sel(counts, list(model.sel))
        entries = getattr(getattr(model, "descriptor", None), "sel_overflow", None)
        found = [-1] + found if found else (entries(vec, center, atype.index_select(0, neighbor), nlocal)
                                            if entries else [])
        n_over = found[4] if found else 0
        zero = torch.zeros(nlocal, dtype=torch.long, device=coord.device)
        # one system: fparam for every atom; the local atoms' aparam rows (global ids)
        params = {key: value.index_select(0, gid) if key == "aparam" else value for key, value in self.params[k].items()}
        if n_over == 0 and nlocal > 0:  # ghosts are neighbours, never centres; the counts were checked above
            graph = {"coord": coord, "atype": atype, "center": center, "neighbor": neighbor, "edge_vec": vec,
                     **params}
            out = evaluate(model, graph, ncenters=nlocal, check_sel=False)
            atom_e = out["atom_energy"]
        else:   # nothing to evaluate here (or the collective overflow error below): zeros, still summed over ranks
            atom_e = torch.zeros(nlocal, dtype=vec.dtype, device=vec.device)
            out = assemble(atom_e, torch.zeros_like(vec), vec, center, neighbor, zero, 1, coord.shape[0])
        force_local = dom.reverse(out["force"][nlocal:], out["force"][:nlocal])
        close = d2[mask] < self.safety.min_distance ** 2 if stops else torch.zeros(0, dtype=torch.bool)
        flags = torch.tensor([float(n_over), float(int(close.sum()))], dtype=vec.dtype, device=coord.device)
        tot = self.comm.allsum(torch.cat([out["energy"], out["virial"].reshape(-1), flags]))
        result = {"energy": tot[:1], "virial": tot[1:10].reshape(1, 3, 3), "force": force_local, "atom_energy": atom_e}
        if int(tot[10]):   # the first atom over the limit, named as the serial check names it (global ids)
            first = None
            if found:
                e, i = found[0], found[1]
                first = (e, int(gid[i]), found[2], found[3], int(atype[i]))
            e, i, t, c, ti = min(f for f in self.comm.allgather(first) if f is not None)
            if e >= 0:
                raise NeighborOverflowError(model.descriptor.overflow_message([e, i, t, c, int(tot[10])], str(i),
                                                                              model.type_map[ti], model.type_map))
            raise NeighborOverflowError(sel_overflow_message(str(i), model.type_map[ti], c,
                                                             sel_group_name(t, list(model.sel), model.type_map),
                                                             model.sel[t], int(tot[10])))
        if int(tot[11]):
            sel = close.nonzero().reshape(-1)
            ng = dom.neighbor_gid[mask][sel].tolist()
            sh = dom.shift[mask][sel].tolist()
            dd = d2[mask][sel].tolist()
            mine = [(int(gid[int(center[e])]), ng[j], sh[j], dd[j] ** 0.5) for j, e in enumerate(sel.tolist())]
            mine = [p for p in mine if p[0] <= p[1]]   # each pair once, as the serial list has it
            result["close"] = sorted(p for part in self.comm.allgather(mine) for p in part)
        return result


class _NullFile:
    def write(self, text):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class _NullOutput:
    """What ranks other than 0 hold in place of the output files."""

    def __init__(self):
        self.thermo = self.devi = _NullFile()
        self.traj = {}

    def files(self):
        return []

    def flush(self):
        pass

    def close(self):
        pass


class ParallelSimulation(Simulation):
    """Simulation over the ranks of `comm` (an mpi4py communicator); same arguments as Simulation, plus
    `grid` (px, py, pz) to force a processor grid (default: the one minimising a brick's surface)."""

    def __init__(self, models, positions, symbols, box=None, *, comm, grid=None, **kwargs):
        self.comm = comm if isinstance(comm, Comm) else Comm(comm)
        if self.comm.rank != 0:
            kwargs["log"] = None
        if kwargs.get("sync_free"):
            raise DpmdError("sync_free: not available under MPI (ghost atoms go through the host every step); "
                            "set sync_free: auto or false")
        kwargs["sync_free"] = False
        super().__init__(models, positions, symbols, box, **kwargs)
        s = self.state
        if s.nframes != 1:
            raise DpmdError(f"MPI runs advance one system; this input has {s.nframes} (run a batch serially)")
        if s.box is None:
            raise DpmdError("MPI domain decomposition needs a periodic cell (structure has open boundaries)")
        rc = max(float(m.rcut) for m in self.models)
        self.domain = Domain(self.comm, s.box[0], rc, self.verlet.skin, grid)
        self.verlet = self.domain                       # .builds, as the engine expects
        self._masses = s.masses[0].clone()
        self._atypes = [a[0].clone() for a in self.atypes]
        self.provider = DomainForces(self.models, self.params, self._atypes, self._masses, self.domain, self.safety)
        self.state = self._distribute(s)

    # ---------------------------------------------------------------- distribution
    @property
    def rank(self) -> int:
        return self.comm.rank

    def _distribute(self, s: MDState) -> DistributedState:
        owner, _, _ = self.domain.owners(s.positions[0].detach().cpu().numpy(), s.box[0].detach().cpu().numpy())
        gid = torch.as_tensor(np.nonzero(owner == self.rank)[0], device=self.device)
        take = (lambda t: None if t is None else t[:, gid].clone())
        self.provider.reset()   # (the lists and ghosts of the atoms this rank held)
        return DistributedState(positions=take(s.positions), velocities=take(s.velocities), masses=take(s.masses),
                                atype=take(s.atype), box=s.box, forces=take(s.forces), energy=s.energy,
                                virial=s.virial, step=s.step, ext_work=s.ext_work, thermostat=s.thermostat,
                                barostat=s.barostat, rng=s.rng, gid=gid, natoms_global=s.natoms, comm=self.comm)

    def _gather_state(self) -> MDState | None:
        """The global state (global-id order) on rank 0, None elsewhere.  Collective."""
        s = self.state
        fields = [s.positions[0], s.velocities[0]] + ([] if s.forces is None else [s.forces[0]])
        parts = self.comm.gather((s.gid.cpu().numpy(), [t.detach().cpu().numpy() for t in fields]))
        if self.rank != 0:
            return None
        n = s.natoms_global
        full = [np.empty((n, 3)) for _ in fields]
        for g, arrays in parts:
            for f, a in zip(full, arrays):
                f[g] = a
        t = [torch.as_tensor(f, dtype=self.dtype, device=self.device).unsqueeze(0) for f in full]
        return MDState(positions=t[0], velocities=t[1], masses=self._masses.unsqueeze(0),
                       atype=self._atypes[0].unsqueeze(0), box=s.box, forces=t[2] if len(t) > 2 else None,
                       energy=s.energy, virial=s.virial, step=s.step, ext_work=s.ext_work,
                       thermostat=s.thermostat, barostat=s.barostat, rng=s.rng)

    def _on_global(self, fn, *args):
        """Run a serial method on rank 0 with self.state the gathered global state.  Collective."""
        g = self._gather_state()
        if self.rank != 0:
            return None
        local, self.state = self.state, g
        try:
            return fn(*args)
        finally:
            self.state = local

    def deviation(self) -> np.ndarray:
        self._ensure_init()
        s = self.state
        forces, virials, energies = [s.forces[0]], [s.virial], [s.energy]
        if len(self.models) > 1:
            coord = self.provider.coords(s)
            for k in range(1, len(self.models)):
                out = self.provider.evaluate(k, coord, s.box[0], s.gid)
                forces.append(out["force"])
                virials.append(out["virial"])
                energies.append(out["energy"])
        local = torch.stack(forces).detach().cpu().numpy()
        full = np.empty((len(forces), s.natoms_global, 3))
        for g, f in self.comm.allgather((s.gid.cpu().numpy(), local)):
            full[:, g] = f
        d = devi_mod.model_deviation(torch.as_tensor(full).unsqueeze(1), torch.stack(virials), torch.stack(energies),
                                     s.natoms_global)
        return d.detach().cpu().numpy()

    # ---------------------------------------------------------------- output, checkpoints
    def _open_outputs(self, restart: bool) -> None:
        if self.output_dir is None or self.outputs:
            return
        if self.rank == 0:
            super()._open_outputs(restart)
        else:
            self.outputs = [_NullOutput()]

    def _write_frame(self, step: int) -> None:
        self._on_global(super()._write_frame, step)

    def checkpoint(self, path=None):
        path = self._on_global(super().checkpoint, path)
        return self.comm.allgather(path)[0]

    def restore(self, path) -> None:
        """As Simulation.restore (a checkpoint written by any number of ranks, or serially)."""
        local, out_dir = self.state, self.output_dir
        self.state = types.SimpleNamespace(positions=torch.empty(1, local.natoms_global, 3))
        if self.rank != 0:
            self.output_dir = None                      # rank 0 alone cuts the files back
        try:
            super().restore(path)
        except Exception:
            self.state = local
            raise
        finally:
            self.output_dir = out_dir
        if self.rank != 0 and out_dir is not None:
            self._open_outputs(restart=True)
        self.state = self._distribute(self.state)

    def _write_crash_frame(self, path) -> None:
        # positions are gathered in global-id order first; rank 0 writes
        self._on_global(super()._write_crash_frame, path)

    def run(self, steps: int | None = None, *, upto: int | None = None) -> dict:
        result = super().run(steps, upto=upto)
        result["rank"], result["ranks"] = self.rank, self.comm.size
        result["grid"] = self.domain.grid.tolist()
        return result
