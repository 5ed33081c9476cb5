"""The explore–label–train loop.

An iteration runs these stages in order; each is skipped when the database says it is done:

    init     (iteration 0 only) label perturbed copies of initial.structures
    train    collect the dataset, train the ensemble (one task per member, which also freezes it; restarts
             from its checkpoint; members train side by side in worker processes when the campaign's cores
             allow, train_members; or as cluster jobs, train.dispatcher)
    explore  one batched dpmd.md.Simulation per (stage, atom count): structures x temperatures x pressures,
             frames and model deviations every traj_interval steps -> one npz per task (explore_group: in
             this process, or as cluster jobs, explore[].dispatcher); engine lammps: one LAMMPS run per
             trajectory instead (explore_label_train/lammps_engine.py), read back into the same npz
    select   classify (accurate / candidate / failed), filter, farthest-point sampling up to the budget,
             create one label task per chosen frame
    label    run the label tasks on the dispatcher (an ASE calculator, or a DFT code in a task folder under
             dispatch/), each result committed with its task, hold out
             select.holdout of the new labels (init does too), then collect
    check    fractions, validation error, convergence decision

Directory layout (work_dir): campaign.db, data/<system>/ (deepmd/npy, rebuilt from the label files),
test_data/<system>/ (the held-out labels, select.holdout: never trained on), iter.NNN/train/mK/
(checkpoints, lcurve.out, model.pth), iter.NNN/explore/<task>.npz (engine lammps: and <task>/t<k>/, the runs'
folders), labels/<task>.npz (one labelled frame each, named by its task id), dispatch/<task>/ (a cluster task's
folder: what its job is sent, linked, and what it brought back, out/, from which the member's folder or the npz
and run folders are installed; dispatch/iNNN-*-inputs/: the data systems, stat file or models a stage's jobs
share).  A cluster job reads and writes only its own folder: no shared filesystem is needed.

The campaign trusts only what its database recorded.  Work is skipped only when the database says it
is done, never because a file exists; each done task records the sha256 of the files it produced, and
every later use checks the file against it (a mismatch is a one-line error: the frames, selections and
labels recorded after it were derived from the recorded file, so redoing that one task would not make
the campaign consistent again).  A work_dir holding campaign files without a database to vouch for them
is refused; `move_aside` (`elt run --move-aside`) moves them into old-<time>/.  `run` takes the
campaign's lock before it writes anything, so a refused run leaves the database untouched.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dpmd.errors import DpmdError
from dpmd.files import atomic_link, atomic_write
from dpmd.runtime import choose_threads, configure_threads, usable_cores
from explore_label_train.config import settings_hash, training_input, trust_levels
from explore_label_train.dispatch import (INPUTS, OUTPUT_DIR, LocalPool, job_folder, make_pool, process_start,
                                          stop_worker)
from explore_label_train.labelers import check_label
from explore_label_train.state import NoCampaignError, State

STAGES = ["init", "train", "explore", "select", "label", "check"]
MODEL_FILE = "model.pth"   # a member's frozen model, beside its checkpoints


class CampaignError(DpmdError):
    pass


START_OVER = "restore it, or start over with `elt run --move-aside`"
CAMPAIGN_FILES = re.compile(r"campaign\.db(-wal|-shm|-journal)?|iter\.\d+|labels|data|test_data|dispatch|report")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def campaign_entries(root: Path) -> list[Path]:
    """What a campaign writes into its work_dir (the database first); anything else there is not ours."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CAMPAIGN_FILES.fullmatch(p.name)]
    return sorted(found, key=lambda p: (not p.name.startswith("campaign.db"), p.name))


@contextmanager
def work_dir_lock(root: Path):
    """One `elt run` (or move-aside) per work_dir at a time; the holder's pid is written into the lock file."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise CampaignError(f"{root}: another `elt run` (pid {holder}) is working on this campaign") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def move_aside(root: Path, inputs=()):
    """Move root's campaign files into root/old-<time>/ (nothing is deleted); returns that folder, or None
    when there was nothing to move.  The database goes first: a move cut short leaves no database that
    could vouch for the files still in place.  `inputs` (the campaign's own input paths) must not move."""
    root = Path(root)
    entries = campaign_entries(root)
    for entry in entries:
        inside = [p for p in map(Path, inputs) if p == entry or entry in p.parents]
        if inside:
            raise CampaignError(f"{entry}: holds the campaign's input {inside[0]}, so it is not moved aside; give "
                                f"the campaign a work_dir of its own")
    if not entries:
        return None
    with work_dir_lock(root):
        dest = base = root / time.strftime("old-%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            dest, n = base.with_name(f"{base.name}-{n}"), n + 1
        dest.mkdir()
        for entry in campaign_entries(root):
            os.replace(entry, dest / entry.name)
    return dest


def install(source: Path, target: Path) -> None:
    """A file or folder a cluster job brought back (source, in its task folder) put in its place in the campaign:
    hard links where the filesystem has them (no second copy), else copies; a file replaced in one step."""
    if not source.exists():
        raise CampaignError(f"{source}: the cluster job brought back no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, symlinks=True, copy_function=atomic_link)
    else:
        atomic_link(source, target)


def atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def read_structure(spec: dict, type_map: list[str], name: str):
    import ase.build
    import ase.io

    try:
        if spec["bulk"] is not None:
            kw = {k: spec[k] for k in ("crystalstructure", "a", "c") if spec[k] is not None}
            atoms = ase.build.bulk(spec["bulk"], cubic=spec["cubic"], orthorhombic=spec["orthorhombic"], **kw)
        elif spec["molecule"] is not None:
            atoms = molecular_cluster(spec["molecule"], spec["copies"], spec["spacing"], spec["seed"])
        else:
            atoms = ase.io.read(spec["file"], index=spec["index"], format=spec["format"])
    except Exception as err:  # noqa: BLE001 - ASE raises many kinds
        raise CampaignError(f"structures.{name}: cannot build/read it ({type(err).__name__}: {err})") from None
    if spec["repeat"]:
        atoms = atoms.repeat(spec["repeat"])
    bad = sorted(set(atoms.get_chemical_symbols()) - set(type_map))
    if bad:
        raise CampaignError(f"structures.{name}: element {bad[0]} is not in type_map {type_map}")
    if atoms.pbc.any() and not atoms.pbc.all():
        raise CampaignError(f"structures.{name}: mixed periodicity {atoms.pbc.tolist()} is not supported")
    return atoms


def molecular_cluster(name: str, copies: int, spacing: float, seed: int = 0):
    """`copies` randomly oriented ASE molecules on the grid points (spacing Å) nearest the centre, open
    boundaries; each orientation is redrawn until its atoms are at least spacing/2 from the others."""
    import ase.build

    mol = ase.build.molecule(name)
    mol.positions -= mol.get_center_of_mass()
    k = int(np.ceil(copies ** (1 / 3) - 1e-9))
    grid = np.array([(i, j, m) for i in range(k) for j in range(k) for m in range(k)], dtype=float)
    grid = grid[np.argsort(np.linalg.norm(grid - (k - 1) / 2, axis=1), kind="stable")][:copies] * spacing
    rng = np.random.default_rng(seed)
    atoms = mol[:0]
    for centre in grid:
        for _ in range(1000):
            q, r = np.linalg.qr(rng.normal(size=(3, 3)))
            rot = q * np.sign(np.diag(r))
            pos = mol.positions @ rot.T + centre
            if len(atoms) == 0 or np.linalg.norm(atoms.positions[:, None] - pos[None], axis=-1).min() >= spacing / 2:
                break
        else:
            raise ValueError(f"cannot place {copies} {name} molecules {spacing} Å apart without overlaps")
        m = mol.copy()
        m.positions = pos
        atoms += m
    atoms.pbc = False
    return atoms


def system_key(symbols, type_map, periodic: bool) -> str:
    counts = {t: 0 for t in type_map}
    for s in symbols:
        counts[s] += 1
    return "".join(f"{t}{n}" for t, n in counts.items() if n) + ("" if periodic else "_nopbc")


def _same_frames(target: Path, system) -> bool:
    """Whether the deepmd/npy system at target holds exactly system's frames and labels."""
    from dpmd.data import load_system

    try:
        old = load_system(target, system.type_map)
    except (DpmdError, OSError):
        return False
    fields = ("atype", "coord", "box", "energy", "force", "virial")
    return all((getattr(old, f) is None) == (getattr(system, f) is None)
               and (getattr(old, f) is None or np.array_equal(getattr(old, f), getattr(system, f))) for f in fields)


def _thermal_velocities(masses: np.ndarray, temps, rng) -> np.ndarray:
    """(F, N, 3) Å/ps at each system's temperature, zero total momentum, rescaled to it exactly."""
    from dpmd.md.units import BOLTZ, MVV2E

    f, n = masses.shape
    v = rng.normal(size=(f, n, 3)) * np.sqrt(BOLTZ * np.asarray(temps)[:, None, None] / (masses[..., None] * MVV2E))
    v -= (masses[..., None] * v).sum(1, keepdims=True) / masses.sum(1)[:, None, None]
    dof = max(3 * n - 3, 1)
    for i, t in enumerate(temps):
        ke = 0.5 * MVV2E * (masses[i, :, None] * v[i] ** 2).sum()
        v[i] = v[i] * np.sqrt(0.5 * dof * BOLTZ * t / ke) if t > 0 and ke > 0 else 0.0 * v[i]
    return v


def training_layout(members: int, work, cores: int | None = None) -> tuple[int, int]:
    """(processes, threads each) to train `members` ensemble members on `cores` cores (None: usable_cores()):
    each member gets the threads its size needs (work: atoms per step, dpmd.runtime.choose_threads) and as many
    members train at once as the cores hold; one process means one after another in the campaign process."""
    from dpmd.runtime import choose_threads, usable_cores

    cores = cores or usable_cores()
    threads = choose_threads(None, work, cores)
    return max(1, min(members, cores // threads)), threads


def resume_point(out: Path, steps: int):
    """The checkpoint a member's training in `out` continues from: its latest, "finished" when that one reached
    `steps`, None when there is none (or none readable)."""
    from dpmd.train.checkpoint import latest_checkpoint, load_checkpoint

    if not ((out / "checkpoint").is_file() or list(out.glob("*.ckpt-*.pt"))):
        return None
    try:
        restart = latest_checkpoint(out)
        return "finished" if load_checkpoint(restart)["step"] >= steps else restart
    except DpmdError:
        return None


def train_member(job: dict) -> dict:
    """Train one ensemble member with the existing Trainer (job: the training input, init_model or finetune
    checkpoint, output folder, "threads": torch threads, None to keep the process's) and freeze it (MODEL_FILE
    in the output folder: the job makes it, not the campaign process); returns its last training errors.  Runs
    in the campaign process, in a training worker (dispatch.LocalPool) or in a cluster job.  With "resume": steps
    it first looks for the checkpoint an earlier attempt left in its folder: one that reached `steps` is only
    frozen (if it was not yet), an earlier one is continued."""
    import torch

    from dpmd.train.freeze import freeze
    from dpmd.train.trainer import Trainer

    out = Path(job["out"])
    init_model, finetune = job["init_model"], job.get("finetune")
    found = resume_point(out, job["resume"]) if job.get("resume") else None
    before = torch.get_num_threads()
    torch.set_num_threads(job.get("threads") or before)
    try:
        errors = {}
        if found != "finished":
            # loader_workers 0: the frames a member draws do not depend on where it trains (this process, a
            # worker process, a cluster node with other cores)
            result = Trainer(job["config"], restart=None if found is None else str(found),
                             init_model=None if found else init_model, finetune=None if found else finetune,
                             out_dir=str(out), progress=False, loader_workers=0).run()
            errors = {k: result.get("train", {}).get(k) for k in ("rmse_e", "rmse_f")}
        if found != "finished" or not (out / MODEL_FILE).is_file():
            freeze(out, out / MODEL_FILE)
    finally:
        torch.set_num_threads(before)
    return errors


def train_members(jobs: dict, processes: int, threads: int | None, on_done, on_start=None) -> None:
    """Train the members in `jobs` (task_id -> train_member job) with `threads` threads each; on_done(task_id,
    ok, value, seconds) as each one ends.  One process: one after another in this process (an error raises);
    more: that many single-member worker processes at once (spawned: each in its own process group, killed
    with this process; a failure is ok=False with its one-line reason).  Same seeds, same threads: the same
    weights either way."""
    jobs = {task_id: {**job, "threads": threads} for task_id, job in jobs.items()}
    if processes <= 1:
        for task_id, job in jobs.items():
            t0 = time.perf_counter()
            value = train_member(job)
            on_done(task_id, True, value, time.perf_counter() - t0)
        return
    LocalPool(processes, timeout=None).run([(task_id, "train", job) for task_id, job in jobs.items()], on_done,
                                           on_start)


def cluster_train_job(it: int, job: dict) -> dict:
    """train_member's job for a cluster that does not share this filesystem: the data systems and
    training.stat_file sent once for the stage's submission (dispatch/iNNN-train-inputs/), the starting
    checkpoint with the job, the member trained and frozen in the job's out/ folder (brought back).  These are
    every path the training input makes a job read (DeePMD-kit's other path keys, use_srtab and a modifier's
    model, are refused by the training input's schema)."""
    common, names = {}, {}   # name under dispatch/ -> local path; local path -> that name

    def sent(path: str) -> str:
        if path not in names:
            names[path] = f"i{it:03d}-train-inputs/s{len(names)}-{Path(path).name}"
            common[names[path]] = path
        return f"../{names[path]}"

    def sent_system(system: str) -> str:
        path, sep, group = system.partition("#")   # an HDF5 file's group stays as it is
        return f"{sent(path)}{sep}{group}"

    config = copy.deepcopy(job["config"])
    training = config["training"]
    for key in ("training_data", "validation_data"):
        if training.get(key):
            training[key]["systems"] = [sent_system(s) for s in training[key]["systems"]]
    if training.get("stat_file"):
        # the file a member training here reads (the Trainer opens it relative to the working directory); the
        # job reads its copy, and what it adds to it (stat_file_mode update) stays with the job
        stat = os.path.abspath(training["stat_file"])
        if not os.path.exists(stat):
            raise CampaignError(f"train.template's training.stat_file {stat}: no such file or folder; a cluster "
                                f"training job reads the statistics but does not bring them back, so make the "
                                f"file first (one local `dpmd train` with this stat_file) or leave the key out")
        training["stat_file"] = sent(stat)
    start = job["init_model"] or job["finetune"]   # (at most one is given)
    return {**job, "config": config, "init_model": job["init_model"] and "start.pt",
            "finetune": job["finetune"] and "start.pt", "out": OUTPUT_DIR,
            INPUTS: {"task": {"start.pt": start} if start else {}, "common": common}}


def cluster_explore_job(it: int, job: dict) -> dict:
    """explore_group's job for a cluster that does not share this filesystem: the models (and a LAMMPS
    stage's template and PLUMED input) sent once for the stage's submission (dispatch/iNNN-explore-<stage>-
    inputs/), the npz written in the job's out/ folder (brought back)."""
    folder = f"i{it:03d}-explore-{job['stage']['name']}-inputs"
    common = {f"{folder}/m{k}.pth": path for k, path in enumerate(job["models"])}
    run = {key: value for key, value in job["stage"].items() if key != "dispatcher"}   # the job's own settings
    if run["lammps"] is not None:
        run["lammps"] = dict(run["lammps"])
        for key in ("template", "plumed"):
            if run["lammps"][key] is not None:
                name = f"{folder}/{key}-{Path(run['lammps'][key]).name}"
                common[name], run["lammps"][key] = run["lammps"][key], f"../{name}"
    return {**job, "models": [f"../{folder}/m{k}.pth" for k in range(len(job["models"]))], "stage": run,
            "out": f"{OUTPUT_DIR}/{Path(job['out']).name}", INPUTS: {"task": {}, "common": common}}


def explore_group(job: dict, models=None) -> dict:
    """One exploration run of a group's trajectories (Campaign._explore_job: plain JSON), frames and model
    deviations every traj_interval steps, written to job["out"] (npz, atomically): one batched dpmd.md.Simulation
    (engine dpmd), or one LAMMPS run per trajectory (engine lammps, explore_label_train/lammps_engine.py), both
    from the same velocities.  Returns {"stop": None, or {"step", "message"} when dpmd's run stopped early (its
    one-line reason)}.  Runs in the campaign process (models: loaded already) or in a cluster job."""
    symbols, seed = job["symbols"], job["seed"]
    # (a cluster job names its models relative to its folder; a LAMMPS run reads them from its own folder)
    job = {**job, "models": [os.path.abspath(m) for m in job["models"]]}
    masses, pos = np.array(job["masses"]), np.array(job["positions"])
    vel = _thermal_velocities(masses, job["temperatures"], np.random.default_rng(seed))
    if job["stage"].get("engine") == "lammps":
        from explore_label_train.lammps_engine import explore

        (coord, boxes, devi, steps, traj), stop = explore(job, vel), None
    else:
        coord, boxes, devi, steps, traj, stop = _explore_dpmd(job, vel, models)
    n = pos.shape[1]
    out = {"symbols": np.array(symbols[0]), "coord": np.array(coord).reshape(-1, n, 3),
           "devi": np.array(devi).reshape(-1, 7), "step": np.array(steps, dtype=np.int64),
           "traj": np.array(traj, dtype=np.int64), "note": np.array(stop["message"] if stop else "")}
    if job["cells"] is not None:
        out["box"] = np.array(boxes).reshape(-1, 3, 3)
    if any(row != symbols[0] for row in symbols):
        out["all_symbols"] = np.array(symbols)
    atomic_savez(Path(job["out"]), **out)
    return {"stop": stop}


def _explore_dpmd(job: dict, vel: np.ndarray, models):
    """explore_group's batched dpmd.md.Simulation: (coord, boxes, devi, steps, traj, stop)."""
    from dpmd.md import Simulation

    if models is None:
        from dpmd.model import load_model

        models = [load_model(p, device=job["stage"].get("device", "cpu")).eval() for p in job["models"]]
    stage, symbols, seed = job["stage"], job["symbols"], job["seed"]
    masses, pos = np.array(job["masses"]), np.array(job["positions"])
    box = None if job["cells"] is None else np.array(job["cells"])
    temps, press = job["temperatures"], job["pressures"]
    bias = None
    if stage["bias"] is not None:
        from explore_label_train.bias import DeviationBias

        bias = DeviationBias(stage["bias"]["strength"], stage["bias"]["scale"])
    sim = Simulation(models, pos, symbols, box, temperature=np.array(temps), pressure=np.array(press),
                     masses=masses, ensemble=stage["ensemble"], thermostat=stage["thermostat"],
                     barostat=stage["barostat"], timestep=stage["timestep"], steps=stage["steps"], seed=seed,
                     min_distance=stage["min_distance"], velocities=vel, thermo_freq=0, log=None, bias=bias)
    coord, boxes, devi, steps, traj = [], [], [], [], []
    stop = None
    nf = len(symbols)
    try:
        for step in range(stage["traj_interval"], stage["steps"] + 1, stage["traj_interval"]):
            sim.run(stage["traj_interval"])
            d = sim.deviation()
            p = sim.state.positions.detach().cpu().numpy()
            b = None if sim.state.box is None else sim.state.box.detach().cpu().numpy()
            for f in range(nf):
                coord.append(p[f])
                if b is not None:
                    boxes.append(b[f])
                devi.append(d[f])
                steps.append(step)
                traj.append(f)
    except DpmdError as err:   # MDStopError (atoms too close, lost atoms, ...) or another one-line reason
        message = str(err).splitlines()[0].split("; wrote")[0]
        at = re.match(r"step (\d+):", message)   # MDStopError names the step it stopped at
        stop = {"step": int(at[1]) if at else int(sim.state.step), "message": message}
    return coord, boxes, devi, steps, traj, stop


class Campaign:
    def __init__(self, cfg: dict, log=print):
        self.cfg = cfg
        self.root = Path(cfg["work_dir"])
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda *a, **k: None)
        self._state = None
        self.type_map = list(cfg["type_map"])
        self.type_index = {t: i for i, t in enumerate(self.type_map)}
        lab = cfg["labeller"]
        if "code" in lab:   # a DFT code: its templates' and pseudopotentials' contents are part of its settings
            from explore_label_train.dft import fingerprint

            self.label_hash, self.labeller_name = fingerprint(lab), lab["code"]
        else:
            self.label_hash, self.labeller_name = settings_hash(lab), lab["calculator"]
        self._structures = {}
        self._models = None

    @property
    def state(self) -> State:
        """The database, opened (and checked) on first use; a fresh work_dir gets a new one."""
        if self._state is None:
            db = self.root / "campaign.db"
            leftovers = [p.name for p in campaign_entries(self.root) if not p.name.startswith("campaign.db")]
            if leftovers:   # files to vouch for: the database must exist already (checked without writing)
                try:
                    State(db).close()
                except NoCampaignError:
                    raise CampaignError(
                        f"{self.root}: holds campaign files ({', '.join(leftovers)}) but no campaign database that "
                        f"recorded them; move them aside with `elt run --move-aside` (into old-<time>/), or "
                        f"choose another work_dir") from None
            self._state = State(db, create=True)
        return self._state

    def _record_config(self) -> None:
        """The settings of this run, recorded; a change since the last run is noted (the labeller's on its own:
        its hash covers a DFT code's template and pseudopotential contents, so an edited INCAR counts)."""
        old, old_label = self.state.get_meta("config_hash"), self.state.get_meta("label_hash")
        new = settings_hash({**{k: v for k, v in self.cfg.items() if k not in ("source",)}, "label": self.label_hash})
        if old != new:
            if old_label is not None and old_label != self.label_hash:
                self.log(f"note: the labeller's settings changed since the last run (settings hash {old_label} -> "
                         f"{self.label_hash}); new labels use the new settings, the labels made before keep theirs")
            elif old is not None:
                self.log("note: the campaign file changed since the last run; continuing with the new settings")
            with self.state.tx() as db:
                self.state.set_meta("config_hash", new, db)
                self.state.set_meta("label_hash", self.label_hash, db)
                self.state.set_meta("config", self.cfg, db)

    def _stop_stale_workers(self) -> None:
        """Label and training workers an earlier, killed run left behind die before any task is handed out again."""
        for r in self.state.q("SELECT task_id, pid, started FROM workers"):
            if stop_worker(r["pid"], r["started"]):
                self.log(f"stopped worker {r['pid']}, left working on {r['task_id']} by an earlier run")
        with self.state.tx() as db:
            db.execute("DELETE FROM workers")

    def _record_worker(self, task_id: str, pid: int) -> None:
        """A worker took a task: recorded, so that a resume can stop it if it outlives this run."""
        with self.state.tx() as db:
            db.execute("INSERT OR REPLACE INTO workers (task_id, pid, started) VALUES (?, ?, ?)",
                       (task_id, pid, process_start(pid)))

    def _jobs_recorder(self, it: int, kind: str):
        """on_jobs for a cluster dispatcher: the stage's jobs recorded as submitted (or found) and as ended, for
        `elt status`; re-attaching to them is dpdispatcher's (DPDispatcherPool)."""
        return lambda submission, jobs: self.state.record_jobs(it, kind, submission, jobs)

    # ------------------------------------------------------------------ helpers
    def result(self, task_id: str) -> dict:
        return json.loads(self.state.one("SELECT result FROM tasks WHERE task_id=? AND status='done'", task_id)
                          or "null") or {}

    def recorded(self, task_id: str, rel) -> Path:
        """root/rel, after checking it is the file that task_id's done row recorded (its sha256)."""
        path = self.root / rel
        want = self.result(task_id).get("files", {}).get(str(rel))
        if want is None:
            raise CampaignError(f"{path}: {self.state.path.name} records no such file for task {task_id}; "
                                f"{START_OVER}")
        if not path.is_file():
            raise CampaignError(f"{path}: missing (task {task_id} recorded it); {START_OVER}")
        if file_sha256(path) != want:
            raise CampaignError(f"{path}: changed since task {task_id} recorded it (sha256 differs); {START_OVER}")
        return path

    def _files(self, *paths: Path) -> dict:
        return {str(p.relative_to(self.root)): file_sha256(p) for p in paths}

    def structures(self, name) -> list:
        """The start configurations a structure name stands for: one, or a group's (files: ...), in order."""
        if name not in self._structures:
            spec = self.cfg["structures"][name]
            specs = [{**spec, "file": f} for f in spec["files"]] if spec["files"] else [spec]
            self._structures[name] = [read_structure(one, self.type_map, name) for one in specs]
        return self._structures[name]

    def structure(self, name):
        """The first (for most, the only) start configuration of a structure name."""
        return self.structures(name)[0]

    def it_dir(self, it: int) -> Path:
        return self.root / f"iter.{it:03d}"

    def model_path(self, it: int, k: int) -> Path:
        return self.it_dir(it) / "train" / f"m{k}" / MODEL_FILE

    def stages_for(self, it: int) -> list[dict]:
        return [s for s in self.cfg["explore"] if s["iterations"] is None or it in s["iterations"]]

    def total_labels(self) -> int:
        return self.state.one("SELECT COUNT(*) FROM labels")

    # ------------------------------------------------------------------ main loop
    def run(self, started=None) -> str:
        """Run (or resume) to the end; returns the decision.  started(): called once this run holds the work_dir
        and its database is open and checked (elt starts campaign.log there: a refused run writes nothing)."""
        with work_dir_lock(self.root):   # before any write: a refused run changes nothing
            self.state   # opened and checked: a refused run stops here
            if started is not None:
                started()
            self._record_config()
            self._stop_stale_workers()
            configure_threads(choose_threads(None, self._explore_work(), self.cfg["threads"] or usable_cores()))
            return self._run()

    def _explore_work(self) -> int:
        """Atoms per evaluation of the largest exploration batch: the work hint of the campaign process's threads."""
        return max(len(atoms) * len(s["temperatures"]) * len(s["pressures"]) * len(s["structures"])
                   for s in self.cfg["explore"] for name in s["structures"] for atoms in self.structures(name)
                   ) * self.cfg["train"]["ensemble_size"]

    def _run(self) -> str:
        it = self.state.one("SELECT MAX(iteration) FROM iterations")
        it = 0 if it is None else it
        while True:
            row = self.state.q("SELECT * FROM iterations WHERE iteration=?", it)
            if row and row[0]["status"] == "done":
                if row[0]["decision"] != "continue":
                    self.log(f"campaign finished: {row[0]['decision']} (iteration {it})")
                    return row[0]["decision"]
                it += 1
                continue
            if not row:
                with self.state.tx() as db:
                    db.execute("INSERT INTO iterations (iteration, status, started) VALUES (?, 'running', ?)",
                               (it, time.time()))
            self._models = None
            for stage in STAGES:
                if self.state.stage_done(it, stage):
                    continue
                self.state.stage_start(it, stage)
                t0 = time.perf_counter()
                finished = getattr(self, f"_stage_{stage}")(it, t0)
                if not finished:
                    with self.state.tx() as db:
                        self.state.stage_finish(it, stage, time.perf_counter() - t0, db=db)
                self.log(f"[iteration {it}] {stage} done ({time.perf_counter() - t0:.1f} s)")

    # ------------------------------------------------------------------ labelling (init and label stages)
    def _label_inputs(self, payload: dict):
        if "positions" in payload:
            return payload["symbols"], np.asarray(payload["positions"]), (
                None if payload["cell"] is None else np.asarray(payload["cell"]))
        with np.load(self.recorded(payload["source"], payload["file"])) as z:
            i = payload["idx"]
            box = z["box"][i] if "box" in z.files else None
            syms = z["all_symbols"][payload["traj"]] if "all_symbols" in z.files else z["symbols"]
            return [str(s) for s in syms], z["coord"][i], box

    def _run_label_tasks(self, it: int) -> None:
        rows = self.state.q("SELECT task_id, payload FROM tasks WHERE iteration=? AND kind='label' AND status='pending' "
                            "ORDER BY task_id", it)
        if not rows:
            return
        lab = self.cfg["labeller"]
        work, meta = [], {}
        disp = self.cfg["dispatcher"]   # local workers share the campaign's cores; a cluster job has its own
        threads = None
        if disp["backend"] == "local":
            threads = max(1, (self.cfg["threads"] or usable_cores()) // disp["workers"])
        for r in rows:
            payload = json.loads(r["payload"])
            symbols, pos, cell = self._label_inputs(payload)
            meta[r["task_id"]] = (payload, symbols, pos, cell)
            frame = {"symbols": [str(s) for s in symbols], "positions": pos.tolist(),
                     "cell": None if cell is None else cell.tolist(), "threads": threads}
            if "code" in lab:   # a DFT code in a task folder (explore_label_train/dft), the same one a cluster job uses
                work.append((r["task_id"], "dft", {**frame, "dft": lab, "fingerprint": self.label_hash,
                                                   "folder": str(job_folder(self.root, r["task_id"]))}))
            else:
                work.append((r["task_id"], "label", {**frame, "calculator": lab["calculator"],
                                                     "kwargs": lab["kwargs"]}))
        counts = {"done": 0, "failed": 0}

        def on_done(task_id, ok, value, seconds):
            payload, symbols, pos, cell = meta[task_id]
            why = ok and check_label(value, symbols, self.cfg["filters"], self._energy_reference(symbols, cell))
            if why:
                ok, value = False, f"label rejected: {why}"
            if not ok:
                self.state.task_failed(task_id, value, seconds)
                counts["failed"] += 1
                self.log(f"[iteration {it}] label {task_id} failed: {value}")
                return
            self._commit_label(it, task_id, payload, symbols, pos, cell, value, seconds)
            counts["done"] += 1

        self.log(f"[iteration {it}] labelling {len(work)} frames with {self.labeller_name}")
        make_pool(disp, self.root).run(work, on_done, self._record_worker, self._jobs_recorder(it, "label"))
        self.log(f"[iteration {it}] labels: {counts['done']} done, {counts['failed']} failed")

    def _energy_reference(self, symbols, cell):
        """The median energy per atom of the labels of this composition (None: no label yet)."""
        key = system_key(symbols, self.type_map, cell is not None)
        rows = self.state.q("SELECT energy / natoms FROM labels WHERE system=?", key)
        return float(np.median([r[0] for r in rows])) if rows else None

    def _commit_label(self, it, task_id, payload, symbols, pos, cell, value, seconds) -> None:
        order = np.argsort([self.type_index[s] for s in symbols], kind="stable")
        symbols = [str(symbols[i]) for i in order]
        rel = Path("labels") / f"{task_id}.npz"
        arrays = {"symbols": np.array(symbols), "coord": np.asarray(pos)[order],
                  "energy": np.array(value["energy"]), "force": np.asarray(value["forces"])[order]}
        if cell is not None:
            arrays["box"] = np.asarray(cell)
        if value.get("virial") is not None:
            arrays["virial"] = np.asarray(value["virial"])
        atomic_savez(self.root / rel, **arrays)   # same name on a redo: overwritten, never duplicated
        key = system_key(symbols, self.type_map, cell is not None)
        with self.state.tx() as db:
            db.execute("INSERT INTO labels (task_id, iteration, frame_id, source, source_traj, source_step, labeller, "
                       "settings_hash, system, natoms, energy, file, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (task_id, it, payload.get("frame_id"), payload["source"], payload.get("traj"),
                        payload.get("step"), self.labeller_name, self.label_hash, key, len(symbols),
                        float(value["energy"]), str(rel), time.time()))
            self.state.task_done(db, task_id, {"energy": float(value["energy"]),
                                               "files": self._files(self.root / rel)}, seconds)

    def collect(self) -> list[str]:
        """Rebuild data/<system> from the committed (and checked) label files, and test_data/<system> from the
        held-out ones; a system is rewritten, atomically, unless what is on disk already holds exactly these
        frames.  Returns the training system directories (data/ only)."""
        from dpmd.data import System, write_system

        rows = self.state.q("SELECT l.task_id, l.system, l.file, h.label_id IS NOT NULL AS held FROM labels l "
                            "LEFT JOIN holdout h USING (label_id) ORDER BY l.iteration, l.task_id")   # not commit order: that
        # depends on which label worker finished first, and the frame order shapes the models
        groups: dict[tuple, list] = {}
        for r in rows:
            groups.setdefault(("test_data" if r["held"] else "data", r["system"]), []).append((r["task_id"], r["file"]))
        dirs = []
        for (folder, key), files in sorted(groups.items()):
            target = self.root / folder / key
            if folder == "data":
                dirs.append(str(target))
            parts = [dict(np.load(self.recorded(task_id, f))) for task_id, f in files]
            atype = np.array([self.type_index[s] for s in parts[0]["symbols"]])
            has_virial = all("virial" in p for p in parts)
            periodic = "box" in parts[0]
            system = System(path=str(target), type_map=self.type_map, atype=atype,
                            coord=np.stack([p["coord"] for p in parts]),
                            box=np.stack([p["box"] for p in parts]) if periodic else None,
                            energy=np.array([float(p["energy"]) for p in parts]),
                            force=np.stack([p["force"] for p in parts]),
                            virial=np.stack([p["virial"] for p in parts]) if has_virial else None)
            if not _same_frames(target, system):
                write_system(system, target, overwrite=True)
        return dirs

    # ------------------------------------------------------------------ stages
    def _stage_init(self, it: int, t0) -> bool:
        ini = self.cfg["initial"]
        if it != 0 or not ini["structures"]:
            return False
        with self.state.tx() as db:
            for si, name in enumerate(ini["structures"]):
                for ci, atoms in enumerate(self.structures(name)):
                    tag = name if ci == 0 else f"{name}.{ci}"   # a group's later files (the first keeps its task ids)
                    for k in range(ini["perturb"]):
                        rng = np.random.default_rng([ini["seed"], si, k] + ([ci] if ci else []))
                        a = atoms.copy()
                        if a.pbc.all() and ini["cell_strain"] > 0:
                            e = rng.uniform(-1, 1, (3, 3)) * ini["cell_strain"]
                            a.set_cell(a.cell[:] @ (np.eye(3) + 0.5 * (e + e.T)), scale_atoms=True)
                        a.positions = a.positions + rng.normal(0, ini["displacement"], a.positions.shape)
                        payload = {"symbols": a.get_chemical_symbols(), "positions": a.positions.tolist(),
                                   "cell": a.cell[:].tolist() if a.pbc.all() else None,
                                   "source": f"initial:{tag}", "step": k}
                        self.state.add_task(db, f"i000-init-{tag}-{k:03d}", 0, "label", payload)
        self._run_label_tasks(it)
        self._check_failed(it)
        return self._hold_out(it, "init", t0)

    def _hold_out(self, it: int, stage: str, t0) -> bool:
        """Keep select.holdout of the labels this stage added out of training (test_data/), then rebuild data/
        and test_data/ and mark the stage done.  No model trains on these labels before the stage is done, so
        a stage cut short simply draws again (the same labels, unless select.holdout changed meanwhile)."""
        from explore_label_train.selection import choose_holdout

        added = "frame_id IS NULL" if stage == "init" else "frame_id IS NOT NULL"
        rows = self.state.q(f"SELECT label_id, task_id FROM labels WHERE iteration=? AND {added}", it)
        held = set(choose_holdout([r["task_id"] for r in rows], self.cfg["select"]["holdout"],
                                  seed=[it, STAGES.index(stage)]))
        with self.state.tx() as db:
            for r in rows:
                db.execute("DELETE FROM holdout WHERE label_id=?", (r["label_id"],))
                if r["task_id"] in held:
                    db.execute("INSERT INTO holdout (label_id, iteration) VALUES (?, ?)", (r["label_id"], it))
        self.collect()
        with self.state.tx() as db:
            self.state.stage_finish(it, stage, time.perf_counter() - t0,
                                    f"{len(rows)} labels, {len(held)} held out for testing", db=db)
        return True

    def _check_failed(self, it: int) -> None:
        """convergence.max_failed_ratio (DP-GEN's ratio_failed): too many of the iteration's label tasks failed."""
        limit = self.cfg["convergence"]["max_failed_ratio"]
        n = self.state.one("SELECT COUNT(*) FROM tasks WHERE iteration=? AND kind='label'", it)
        failed = self.state.one("SELECT COUNT(*) FROM tasks WHERE iteration=? AND kind='label' AND status='failed'", it)
        if limit is not None and n and failed / n > limit:
            reason = self.state.one("SELECT reason FROM tasks WHERE iteration=? AND kind='label' AND status='failed' "
                                    "ORDER BY task_id LIMIT 1", it)
            raise CampaignError(f"iteration {it}: {failed} of {n} label tasks failed, over "
                                f"convergence.max_failed_ratio {limit:g} (first: {reason})")

    def _previous_checkpoint(self, it: int, k: int):
        """(path, sha256) of the checkpoint member k starts from: the previous iteration's final one (from
        train.init_from_previous's iteration on), train.init_models[k] at iteration 0, or None."""
        tr = self.cfg["train"]
        if it == 0 and tr["init_models"]:
            return Path(tr["init_models"][k]), file_sha256(Path(tr["init_models"][k]))
        start = tr["init_from_previous"]
        if it == 0 or start is False or it < int(start):
            return None
        task_id = f"i{it - 1:03d}-train-m{k}"
        result = self.result(task_id)
        return self.recorded(task_id, result["checkpoint"]), result["files"][result["checkpoint"]]

    def _train_systems(self) -> list[str]:
        systems = list(self.cfg["initial"]["data"]) + self.collect()
        if not systems:
            raise CampaignError("no training data: initial.data is empty and no label has succeeded")
        return systems

    def _stage_train(self, it: int, t0) -> bool:
        from dpmd.runtime import training_work
        from dpmd.train.checkpoint import latest_checkpoint

        tr = self.cfg["train"]
        systems = self._train_systems()
        # DP-GEN's fp_task_min: after an iteration that added too few labels, its models serve again untrained
        added = self.state.one("SELECT COUNT(*) FROM labels WHERE iteration=?", it - 1) if it else None
        reuse = it > 0 and added < tr["min_new_labels"]
        cluster = tr["dispatcher"] is not None
        jobs, members = {}, {}   # task_id -> train_member's job; task_id -> (k, steps, init)
        for k in range(tr["ensemble_size"]):
            task_id = f"i{it:03d}-train-m{k}"
            self.state.ensure_task(task_id, it, "train")
            if self.state.task_status(task_id) == "done":
                continue
            out = self.model_path(it, k).parent
            if reuse:
                self._reuse_member(it, k, task_id, systems)
                continue
            previous = self._previous_checkpoint(it, k)
            init = None if previous is None else str(previous[0])
            steps = tr["reuse_numb_steps"] if init else tr["numb_steps"]
            config = training_input(self.cfg, systems, steps, k, it)
            # the attempt's settings are recorded before it starts: checkpoints in `out` are continued only
            # when they come from an attempt with the same settings, else they are cleared away (a cluster job
            # trains in its own folder, dispatch/<task_id>, where it continues itself: `out` only receives
            # what it brought back)
            attempt = {"settings": settings_hash({"input": config, "init": previous and previous[1]})}
            same = json.loads(self.state.one("SELECT payload FROM tasks WHERE task_id=?", task_id) or "null") == attempt
            if out.exists() and not (same and not cluster and resume_point(out, steps) is not None):
                shutil.rmtree(out)
            if not same:
                with self.state.tx() as db:
                    db.execute("UPDATE tasks SET payload=? WHERE task_id=?", (json.dumps(attempt), task_id))
            members[task_id] = (k, steps, init)
            finetune = it == 0 and tr["finetune"]
            job = {"config": config, "init_model": None if finetune else init, "finetune": init if finetune else None,
                   "out": str(out), "resume": steps}
            jobs[task_id] = cluster_train_job(it, job) if cluster else job
        failed = []

        def on_done(task_id, ok, value, seconds):
            k, steps, init = members[task_id]
            out = self.model_path(it, k).parent
            if ok:
                try:
                    if cluster:   # the member's folder as the job brought it back
                        install(job_folder(self.root, task_id) / OUTPUT_DIR, out)
                    if not self.model_path(it, k).is_file():
                        raise CampaignError(f"{self.model_path(it, k)}: the training job left no frozen model")
                    checkpoint = latest_checkpoint(out)
                except (DpmdError, OSError) as err:
                    ok, value = False, str(err).splitlines()[0]
            if not ok:
                failed.append(f"m{k} ({task_id}): {value}")
                return
            summary = {"steps": steps, "init_model": init, "systems": systems,
                       "rmse_e": value.get("rmse_e"), "rmse_f": value.get("rmse_f"),
                       "checkpoint": str(checkpoint.relative_to(self.root)),
                       "files": self._files(self.model_path(it, k), checkpoint)}
            with self.state.tx() as db:
                self.state.task_done(db, task_id, summary, seconds)
            from dpmd.train.trainer import describe_errors

            errors = describe_errors({key: v for key, v in value.items()
                                      if key in ("rmse_e", "rmse_f") and v is not None})
            self.log(f"[iteration {it}] trained m{k}: {steps} steps"
                     + (f"; last training batch: {errors}" if errors else ""))

        if jobs and cluster:   # cluster jobs, each with the cores its resources give it
            self.log(f"[iteration {it}] training {len(jobs)} members as cluster jobs")
            make_pool(tr["dispatcher"], self.root).run([(task_id, "train", job) for task_id, job in jobs.items()],
                                                       on_done, None, self._jobs_recorder(it, "train"))
        elif jobs:
            processes, threads = training_layout(len(jobs), training_work(next(iter(jobs.values()))["config"]),
                                                 self.cfg["threads"])
            if processes > 1:
                self.log(f"[iteration {it}] training {len(jobs)} members, {processes} at a time "
                         f"({threads} thread{'s' if threads > 1 else ''} each)")
            train_members(jobs, processes, threads, on_done, self._record_worker)
        if failed:
            raise CampaignError(f"training failed: {failed[0]}" + (f" (and {len(failed) - 1} more member(s))"
                                                                   if len(failed) > 1 else ""))
        return False

    def _reuse_member(self, it: int, k: int, task_id: str, systems) -> None:
        """Member k of iteration it is the previous iteration's, copied (model file and final checkpoint)."""
        before = f"i{it - 1:03d}-train-m{k}"
        result = self.result(before)
        out = self.model_path(it, k).parent
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = self.recorded(before, result["checkpoint"])
        shutil.copyfile(self.recorded(before, self.model_path(it - 1, k).relative_to(self.root)), out / "model.pth")
        shutil.copyfile(checkpoint, out / checkpoint.name)
        summary = {**result, "steps": 0, "reused": before, "systems": systems,
                   "checkpoint": str((out / checkpoint.name).relative_to(self.root)),
                   "files": self._files(out / "model.pth", out / checkpoint.name)}
        with self.state.tx() as db:
            self.state.task_done(db, task_id, summary, 0.0)
        self.log(f"[iteration {it}] m{k}: the previous iteration added fewer than train.min_new_labels labels; "
                 f"reusing {before}")

    def models(self, it: int):
        if self._models is None:
            from dpmd.model import load_model

            paths = [self.recorded(f"i{it:03d}-train-m{k}", self.model_path(it, k).relative_to(self.root))
                     for k in range(self.cfg["train"]["ensemble_size"])]
            self._models = [load_model(p).eval() for p in paths]
        return self._models

    def _stage_explore(self, it: int, t0) -> bool:
        for stage in self.stages_for(it):
            trajs = [(name, atoms, float(t), float(p)) for name in stage["structures"]
                     for atoms in self.structures(name) for t in stage["temperatures"] for p in stage["pressures"]]
            groups: dict = {}
            for tr in trajs:
                groups.setdefault((len(tr[1]), bool(tr[1].pbc.all())), []).append(tr)
            todo = {}   # task_id -> (group index, members, file): the groups not explored yet
            for gi, ((natoms, pbc), members) in enumerate(sorted(groups.items())):
                task_id = f"i{it:03d}-explore-{stage['name']}-g{gi}"
                self.state.ensure_task(task_id, it, "explore")
                if self.state.task_status(task_id) != "done":
                    todo[task_id] = (gi, members, Path(f"iter.{it:03d}") / "explore" / f"{task_id}.npz")
            if not todo:
                continue
            models = [str(self.recorded(f"i{it:03d}-train-m{k}", self.model_path(it, k).relative_to(self.root)))
                      for k in range(self.cfg["train"]["ensemble_size"])]
            jobs = {task_id: self._explore_job(it, stage, gi, members, rel, models)
                    for task_id, (gi, members, rel) in todo.items()}
            if stage["dispatcher"] is None:   # in this process (a file left by a crash: overwritten, not trusted)
                for task_id, job in jobs.items():
                    t1 = time.perf_counter()
                    # (the campaign's cached models are on the CPU; a GPU stage loads its own)
                    here = stage["engine"] == "dpmd" and stage["device"] == "cpu"
                    value = explore_group(job, self.models(it) if here else None)
                    self._explored(it, stage, task_id, *todo[task_id][1:], value["stop"], time.perf_counter() - t1)
            else:
                self._explore_on_cluster(it, stage, jobs, todo)
        return False

    def _explore_on_cluster(self, it, stage, jobs: dict, todo: dict) -> None:
        """A stage's exploration groups as cluster jobs; each recorded as it comes back; a failed one stops the
        stage with its reason once the others are recorded (the next run submits it again)."""
        failed = []

        def on_done(task_id, ok, value, seconds):
            rel = todo[task_id][2]
            if ok:
                back = job_folder(self.root, task_id) / OUTPUT_DIR
                try:   # the npz as the job brought it back, and LAMMPS's run folders where a local run leaves them
                    if stage["engine"] == "lammps":
                        install(back / rel.stem, self.root / rel.with_suffix(""))
                    install(back / rel.name, self.root / rel)
                except (DpmdError, OSError) as err:
                    ok, value = False, str(err).splitlines()[0]
            if not ok:
                failed.append(f"{task_id}: {value}")
                return
            self._explored(it, stage, task_id, *todo[task_id][1:], value["stop"], seconds)

        self.log(f"[iteration {it}] exploring {stage['name']}: {len(jobs)} group(s) as cluster jobs")
        make_pool(stage["dispatcher"], self.root).run(
            [(task_id, "explore", cluster_explore_job(it, job)) for task_id, job in jobs.items()],
            on_done, None, self._jobs_recorder(it, "explore"))
        if failed:
            raise CampaignError(f"exploration failed: {failed[0]}" + (f" (and {len(failed) - 1} more)"
                                                                      if len(failed) > 1 else ""))

    def _explore_job(self, it, stage, gi, members, rel, models) -> dict:
        """explore_group's job for a group's trajectories (members: (structure, atoms, temperature, pressure)),
        plain JSON: the same job runs in this process or in a cluster job."""
        atoms = [m[1] for m in members]
        symbols = [a.get_chemical_symbols() for a in atoms]
        return {"models": models, "symbols": symbols, "positions": np.stack([a.positions for a in atoms]).tolist(),
                "cells": np.stack([a.cell[:] for a in atoms]).tolist() if atoms[0].pbc.all() else None,
                "masses": [[self.cfg["masses"][self.type_index[s]] for s in row] for row in symbols],
                "type_map": self.type_map, "type_masses": self.cfg["masses"],
                "temperatures": [m[2] for m in members], "pressures": [m[3] for m in members], "stage": stage,
                "seed": stage["seed"] + 1000 * it + 37 * gi, "out": str(self.root / rel)}

    def _explored(self, it, stage, task_id, members, rel, stop, seconds) -> None:
        """Record an exploration run: its frames, classified, its incident (a run that stopped early) and its
        task done, in one transaction."""
        from explore_label_train.selection import classify

        with np.load(self.root / rel) as f:
            z = dict(f)
        note = stop and f"stopped early: {stop['message']}"
        levels = [trust_levels(self.cfg, stage, members[int(t)][0]) for t in z["traj"]]
        inf = float("inf")   # no virial level: no virial criterion
        classes = classify(z["devi"][:, 3], [v["lo"] for v in levels], [v["hi"] for v in levels],
                           z["devi"][:, 0], [inf if v["v_lo"] is None else v["v_lo"] for v in levels],
                           [inf if v["v_hi"] is None else v["v_hi"] for v in levels]) if len(z["devi"]) else []
        with self.state.tx() as db:
            for i in range(len(z["step"])):
                if z["step"][i] < stage["skip_steps"]:   # DP-GEN's model_devi_skip: kept, never classified
                    continue
                m = members[int(z["traj"][i])]
                dv = z["devi"][i]
                db.execute("INSERT OR IGNORE INTO frames (iteration, task_id, file, idx, stage, traj, structure, "
                           "temperature, pressure, step, max_devi_f, avg_devi_f, max_devi_v, devi_e, class) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (it, task_id, str(rel), i, stage["name"], int(z["traj"][i]), m[0], m[2], m[3],
                            int(z["step"][i]), float(dv[3]), float(dv[5]), float(dv[0]), float(dv[6]),
                            str(classes[i])))
            if stop:
                # a batch stops as a whole: the incident names the systems dpmd's message names
                named = sorted({int(x) for x in re.findall(r"of system (\d+)", stop["message"])}) or (
                    [0] if len(members) == 1 else [None])
                for traj in named:
                    m = members[traj] if traj is not None else (None, None, None, None)
                    db.execute("INSERT INTO incidents (task_id, iteration, stage, step, traj, structure, "
                               "temperature, pressure, message) VALUES (?,?,?,?,?,?,?,?,?)",
                               (task_id, it, stage["name"], stop["step"], traj, m[0], m[2], m[3], stop["message"]))
            self.state.task_done(db, task_id, {"frames": int(len(z["step"])), "trajectories": len(members),
                                               "note": note or None, "files": self._files(self.root / rel)}, seconds)
        self.log(f"[iteration {it}] explored {task_id}: {len(members)} trajectories x {len(members[0][1])} atoms, "
                 f"{len(z['step'])} frames" + (f" ({note})" if note else ""))

    def _stage_select(self, it: int, t0) -> bool:
        from explore_label_train.selection import (adaptive_pools, check_frame, choose, choose_stratified,
                                                   frame_descriptors, labelled_count)

        sel, filters = self.cfg["select"], self.cfg["filters"]
        frames = self.state.q("SELECT * FROM frames WHERE iteration=? ORDER BY frame_id", it)
        files: dict = {}

        def frame(r):
            if r["file"] not in files:
                files[r["file"]] = dict(np.load(self.recorded(r["task_id"], r["file"])))
            z = files[r["file"]]
            syms = z["all_symbols"][r["traj"]] if "all_symbols" in z else z["symbols"]
            return [str(s) for s in syms], z["coord"][r["idx"]], (z["box"][r["idx"]] if "box" in z else None)

        updates = {}   # frame_id -> (filter, reason)
        passing = []
        for r in frames:
            if r["class"] == "accurate":
                updates[r["frame_id"]] = (None, f"accurate: max_devi_f {r['max_devi_f']:.3g} < lo")
            elif r["class"] == "failed":
                updates[r["frame_id"]] = (None, f"failed: max_devi_f {r['max_devi_f']:.3g} >= hi")
            else:
                syms, pos, cell = frame(r)
                why = check_frame(syms, pos, cell, filters)
                if why:
                    updates[r["frame_id"]] = (why, f"rejected by filter: {why}")
                else:
                    passing.append(r)
        left = max(0, self.cfg["convergence"]["max_labels"] - self.total_labels())
        budget = min(sel["budget"], left)
        features = None
        if sel["method"] == "fps" and len(passing) > budget > 0:
            model = self.models(it)[0]
            by_n: dict = {}
            for j, r in enumerate(passing):
                syms, pos, cell = frame(r)
                by_n.setdefault((len(syms), cell is not None, tuple(syms)), []).append((j, pos, cell))
            feats = [None] * len(passing)
            for (n, periodic, syms), items in by_n.items():
                types = [model.type_map.index(s) for s in syms]
                f = frame_descriptors(model, np.stack([x[1] for x in items]), types,
                                      np.stack([x[2] for x in items]) if periodic else None)
                for (j, _, _), row in zip(items, f):
                    feats[j] = row
            features = np.stack(feats)
        groups: dict = {}   # the budget's scope: the iteration, or each structure (select.per_structure)
        for j, r in enumerate(passing):
            groups.setdefault(r["structure"] if sel["per_structure"] else None, []).append(j)
        # adaptive's pools count the explored frames below trust.hi in the budget's scope
        below_hi = Counter(r["structure"] if sel["per_structure"] else None for r in frames if r["class"] != "failed")
        chosen, reasons = [], {}
        for key, idx in groups.items():
            rows, share = [dict(passing[j]) for j in idx], min(sel["budget"], left)
            feats = None if features is None else features[idx]
            pool, pool_v = adaptive_pools(sel, below_hi[key])
            count = labelled_count(rows, share, sel["method"], pool, pool_v) if sel["min_labels"] else share
            if count < sel["min_labels"]:   # DP-GEN's fp_task_min
                sub, why = [], {s: f"not selected: {count} to label{f' of {key}' if key else ''}, fewer than "
                                   f"select.min_labels {sel['min_labels']}" for s in range(len(idx))}
            elif sel["stratify"]:  # each exploration condition gets its share of the budget
                strata = [(r["structure"], r["temperature"], r["pressure"]) for r in rows]
                sub, why = choose_stratified(rows, strata, share, sel["method"], feats, seed=it, pool=pool,
                                             pool_v=pool_v)
            else:
                sub, why = choose(rows, share, sel["method"], feats, seed=it, pool=pool, pool_v=pool_v)
            chosen += [idx[s] for s in sub]
            reasons.update({idx[s]: w for s, w in why.items()})
            left -= len(sub)
        chosen_ids = {passing[j]["frame_id"] for j in chosen}
        for j, r in enumerate(passing):
            updates[r["frame_id"]] = (None, reasons[j])
        with self.state.tx() as db:
            for fid, (filt, reason) in updates.items():
                db.execute("UPDATE frames SET filter=?, reason=?, selected=? WHERE frame_id=?",
                           (filt, reason, int(fid in chosen_ids), fid))
            for r in passing:
                if r["frame_id"] in chosen_ids:
                    payload = {"frame_id": r["frame_id"], "file": r["file"], "idx": r["idx"],
                               "source": r["task_id"], "traj": r["traj"], "step": r["step"]}
                    self.state.add_task(db, f"i{it:03d}-label-f{r['frame_id']}", it, "label", payload)
            note = (f"{len(frames)} frames, {len(passing)} candidates passed the filters, "
                    f"{len(chosen_ids)} selected (budget {budget})")
            self.state.stage_finish(it, "select", time.perf_counter() - t0, note, db=db)
        self.log(f"[iteration {it}] select: {note}")
        return True

    def _stage_label(self, it: int, t0) -> bool:
        self._run_label_tasks(it)
        self._check_failed(it)
        return self._hold_out(it, "label", t0)

    def _validation_error(self, it: int):
        """Force RMSE (eV/Å) and energy RMSE per atom (eV) of model 0 on the labels this iteration added."""
        rows = self.state.q("SELECT task_id, file FROM labels WHERE iteration=? AND frame_id IS NOT NULL", it)
        if not rows:
            return None, None
        import torch

        model = self.models(it)[0]
        se_f, nf_atoms, se_e = 0.0, 0, 0.0
        for r in rows:
            z = np.load(self.recorded(r["task_id"], r["file"]))
            types = torch.tensor([model.type_map.index(str(s)) for s in z["symbols"]])
            box = torch.as_tensor(z["box"]) if "box" in z.files else None
            out = model(torch.as_tensor(z["coord"]), types, box)
            n = len(types)
            se_f += float(((out["force"].detach().numpy() - z["force"]) ** 2).sum())
            nf_atoms += 3 * n
            se_e += ((float(out["energy"]) - float(z["energy"])) / n) ** 2
        return (se_e / len(rows)) ** 0.5, (se_f / nf_atoms) ** 0.5

    def _stage_check(self, it: int, t0) -> bool:
        cv = self.cfg["convergence"]
        st = self.state
        n = st.one("SELECT COUNT(*) FROM frames WHERE iteration=?", it)
        cnt = {c: st.one("SELECT COUNT(*) FROM frames WHERE iteration=? AND class=?", it, c)
               for c in ("accurate", "candidate", "failed")}
        frac = {c: (v / n if n else 0.0) for c, v in cnt.items()}
        n_filtered = st.one("SELECT COUNT(*) FROM frames WHERE iteration=? AND filter IS NOT NULL", it)
        n_selected = st.one("SELECT COUNT(*) FROM frames WHERE iteration=? AND selected=1", it)
        n_labels = st.one("SELECT COUNT(*) FROM labels WHERE iteration=?", it)
        total = self.total_labels()
        val_e, val_f = self._validation_error(it)
        if n and cv["accurate_ratio"] is not None and frac["accurate"] >= cv["accurate_ratio"]:
            decision = "converged"
        elif it + 1 >= cv["max_iterations"]:
            decision = "max_iterations"
        elif total >= cv["max_labels"]:
            decision = "max_labels"
        elif not self.stages_for(it + 1):
            decision = "no exploration stage for the next iteration"
        else:
            decision = "continue"
        with st.tx() as db:
            db.execute("UPDATE iterations SET status='done', finished=?, n_frames=?, accurate=?, candidate=?, failed=?, "
                       "n_filtered=?, n_selected=?, n_labels=?, total_labels=?, val_rmse_e=?, val_rmse_f=?, decision=? "
                       "WHERE iteration=?", (time.time(), n, frac["accurate"], frac["candidate"], frac["failed"],
                                             n_filtered, n_selected, n_labels, total, val_e, val_f, decision, it))
            st.stage_finish(it, "check", time.perf_counter() - t0, decision, db=db)
        self.log(f"[iteration {it}] accurate {frac['accurate']:.1%} candidate {frac['candidate']:.1%} "
                 f"failed {frac['failed']:.1%}; labels {total}; "
                 + (f"validation rmse_f {val_f:.3g} eV/Å; " if val_f is not None else "") + f"-> {decision}")
        return True
