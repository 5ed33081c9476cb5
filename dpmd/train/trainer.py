"""The training loop: Adam on DeePMD's energy/force/virial loss, with lcurve, checkpoints and restart.

Run state that a restart needs (weights, optimizer, step, sampler orders and generators) lives
in each checkpoint, so a run killed after a checkpoint and restarted from it writes the same
lcurve as an unbroken run.  Training runs on `training.device` (data, model, optimizer state; statistics are
taken on the host first).  Data-parallel under torchrun: every worker draws the same global batch and trains
on its slice; DistributedDataParallel averages the gradients; only rank 0 writes.
Progress goes to the `dpmd.train.trainer` logger (dpmd.log).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import time
from pathlib import Path

import torch

from dpmd import ops
from dpmd.data import check_params, load_systems
from dpmd.errors import ConfigError, DpmdError
from dpmd.geometry.graph import build_graph, edge_vectors
from dpmd.geometry.neighbor import NeighborList, build_neighbor_list, count_neighbors
from dpmd.model import DeepPot, evaluate, load_model
from dpmd.model.args import normalize_model_config, set_precision
from dpmd.model.descriptor import auto_sel_pending, config_rcut, resolve_auto_sel, sections
from dpmd.model.network import set_compute_precision
from dpmd.files import atomic_write
from dpmd.model.stats import descriptor_stats, energy_bias, param_stats, refit_energy_bias, stat_leaves
from dpmd.train import stat_file
from dpmd.train.checkpoint import (check_finite, folder_runs, latest_checkpoint, load_checkpoint, move_aside,
                                   new_run_id, run_files, save_checkpoint, tidy)
from dpmd.train.loss import EnergyLoss
from dpmd.train.sampler import BatchSampler, main_generator
from dpmd.train.schedule import learning_rate

log = logging.getLogger(__name__)
UNITS = {"rmse_e": ("energy", "eV/atom"), "rmse_f": ("force", "eV/Å"), "rmse_v": ("virial", "eV/atom")}


def describe_errors(metrics: dict) -> str:
    """'energy 1.2e-03 eV/atom, force 1.5e-01 eV/Å' from a loss's rmse_* figures (lcurve.out's columns)."""
    return ", ".join(f"{what} {metrics[k]:.3e} {unit}" for k, (what, unit) in UNITS.items() if k in metrics)


class FrameStore:
    """Training frames as tensors on `device`, with each frame's neighbour list built once (on the host, by
    the kernel library) and kept on the device (up to `max_cached_edges` edges, about 40 bytes each; beyond that
    lists are rebuilt per use): a batch copies nothing but its frame indices to the device."""

    def __init__(self, systems, rcut: float, max_cached_edges: int = 50_000_000, device="cpu"):
        self.systems, self.rcut, self.device = systems, rcut, torch.device(device)
        self._nl: dict[tuple[int, int], NeighborList] = {}
        self._cached_edges, self.max_cached_edges = 0, max_cached_edges
        self.tensors = [{k: (None if getattr(s, k) is None else torch.as_tensor(getattr(s, k)).to(self.device))
                         for k in ("coord", "box", "energy", "force", "virial", "fparam", "aparam", "atype")}
                        for s in systems]
        self.params: tuple = (False, False, None)  # the model takes fparam, aparam; its default_fparam (take_params)

    def take_params(self, fitting) -> None:
        """Batches carry the fparam / aparam that `fitting` takes, checked per system (one line naming it); a
        system without fparam.npy gets the model's default_fparam."""
        for s in self.systems:
            check_params(s, fitting.numb_fparam, fitting.numb_aparam, fitting.default_fparam_tensor)
        default = fitting.default_fparam_tensor
        self.params = (fitting.numb_fparam > 0, fitting.numb_aparam > 0,
                       None if default is None else default.to(self.device))

    def neighbors(self, i: int, f: int) -> NeighborList:
        key = (i, f)
        if key in self._nl:
            return self._nl[key]
        s = self.systems[i]
        nlist = build_neighbor_list(torch.as_tensor(s.coord[f]), None if s.box is None else torch.as_tensor(s.box[f]),
                                    self.rcut)
        if self.device.type != "cpu":
            nlist = NeighborList(*(t.to(self.device) for t in (nlist.center, nlist.neighbor, nlist.shift)))
        if self._cached_edges + len(nlist) <= self.max_cached_edges:
            self._nl[key] = nlist
            self._cached_edges += len(nlist)
        return nlist

    def batch(self, i: int, frames: torch.Tensor) -> tuple[dict, dict]:
        t = self.tensors[i]
        index = torch.as_tensor(frames).to(self.device)  # one small copy to the device
        frames = frames.tolist()
        box = None if t["box"] is None else t["box"][index]
        graph = build_graph(t["coord"][index], t["atype"], box, neighbors=[self.neighbors(i, f) for f in frames])
        takes_fparam, takes_aparam, default_fparam = self.params
        if takes_fparam:
            graph["fparam"] = t["fparam"][index] if t["fparam"] is not None else default_fparam.expand(len(frames), -1)
        if takes_aparam:
            graph["aparam"] = t["aparam"][index].reshape(-1, t["aparam"].shape[-1])
        label = {k: (None if t[k] is None else t[k][index]) for k in ("energy", "force", "virial")}
        if label["force"] is not None:
            label["force"] = label["force"].reshape(-1, 3)
        return graph, label

    def max_neighbors(self, ntypes: int, rcut: float | None = None, total: bool = False) -> list[int]:
        """The largest count of neighbours of each type of any atom (total: [the largest count of all types]),
        within rcut (at most the store's)."""
        best = torch.zeros(1 if total else ntypes, dtype=torch.long, device=self.device)
        for i, s in enumerate(self.systems):
            t = self.tensors[i]
            for f in range(s.nframes):
                nl = self.neighbors(i, f)
                if rcut is not None and rcut < self.rcut:  # an entry of a hybrid with a shorter cut-off
                    graph = build_graph(t["coord"][f], t["atype"], None if t["box"] is None else t["box"][f],
                                        neighbors=[nl])
                    keep = edge_vectors(graph).norm(dim=-1) < rcut
                    nl = NeighborList(nl.center[keep], nl.neighbor[keep], nl.shift[keep])
                counts = count_neighbors(nl, t["atype"], ntypes, s.natoms)
                if total:
                    counts = counts.sum(1, keepdim=True)
                best = torch.maximum(best, counts.max(dim=0).values)
        return best.tolist()


class Progress:
    """Progress lines: at display steps (with the errors shown) and, between them, at least every `every`
    seconds, so that a slow run is never silent for long."""

    def __init__(self, total: int, start: int, enabled: bool = True, every: float = 60.0):
        self.total, self.start_step, self.t0 = total, start, time.perf_counter()
        self.enabled, self.every, self.last = enabled, every, self.t0

    def update(self, step: int, display: str | None) -> None:
        now = time.perf_counter()
        if not self.enabled or (display is None and now - self.last < self.every):
            return
        self.last = now
        rate = (now - self.t0) / max(step - self.start_step, 1)
        eta = rate * (self.total - step)
        log.info(f"step {step}/{self.total}  {rate:.3f} s/step  ETA {eta / 60:.1f} min  {display or ''}".rstrip())


def training_device(setting: str) -> torch.device:
    """`training.device` (auto, cpu, cuda, cuda:N) as this worker's device: under torchrun worker LOCAL_RANK of a
    node takes cuda:LOCAL_RANK.  auto is cuda when every worker of the node has a GPU (else cpu for all: one
    backend for every worker)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        setting = "cuda" if gpus >= workers else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if setting != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"'training.device' is {setting}, but under torchrun every worker takes cuda:LOCAL_RANK; "
                          f"give cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    index = local_rank if setting == "cuda" else int(setting.split(":")[1])
    if index >= gpus:
        seen = (f"no CUDA device is visible to this torch ({torch.__version__})" if gpus == 0 else
                f"{gpus} CUDA device(s) are visible")
        who = f" (worker LOCAL_RANK={local_rank} takes cuda:{index})" if workers > 1 else ""
        raise ConfigError(f"'training.device' is {setting}{who} but {seen}; give cpu, or auto")
    return torch.device("cuda", index)


def _dist_info(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        torch.cuda.set_device(device)   # NCCL, and any tensor made on plain "cuda", use the current device
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


# the buffers (statistics, energy bias) are the same on every worker and never change while training: no copy of
# them at every forward (torch 2.13 renamed the switch, warning at the old name on every worker)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def _on_host(state):
    """A copy of nested dicts and lists with their tensors on the host (the same tensors on a CPU)."""
    if isinstance(state, dict):
        return {k: _on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_host(v) for v in state)
    return state.cpu() if torch.is_tensor(state) else state


class _Forces(torch.nn.Module):
    """A training batch's energies, forces and virials as a module's forward: DistributedDataParallel starts
    the all-reduce of the weights' gradients from its wrapper's forward.  The force loss's double backward
    suits it: the forces' autograd.grad inside forward (create_graph, to the edge vectors only) accumulates no
    weight gradient; the loss's backward, through that graph, then fills each weight's .grad once, which is
    where DDP's hooks all-reduce it."""

    def __init__(self, model: DeepPot):
        super().__init__()
        self.model = model

    def forward(self, graph: dict, create_graph: bool) -> dict:
        # the force loss differentiates forces by the weights only: the embedding nets may be linearised
        with ops.weight_gradients_only():
            return evaluate(self.model, graph, create_graph=create_graph)


def adam(params, lr: float, adam_beta1: float = 0.9, adam_beta2: float = 0.999,
         weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam (the `optimizer` section's keys; weight_decay is an L2 term added to the gradients, as in
    DeePMD-kit), with its fused kernel where this torch has one for the device (CPU: torch >= 2.4; ~3x faster
    than the per-tensor loop), else the default implementation (the same update rule)."""
    params = list(params)
    kw = {"lr": lr, "betas": (adam_beta1, adam_beta2), "weight_decay": weight_decay}
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, **kw)


def _first_difference(old, new, where: str):
    """(dotted key, old value, new value) of the first difference between two config sections, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = _first_difference(old.get(key, "(absent)"), new.get(key, "(absent)"), f"{where}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else (where, old, new)


def _check_restart(ckpt: dict, config: dict, path) -> None:
    """A restart continues the checkpoint's model (to the input's numb_steps: DeePMD-kit's rule, checked by
    _check_steps); the learning rate, loss and training keys come from the input."""
    try:  # with the defaults of this dpmd, so that a key added since the checkpoint is no difference
        old = normalize_model_config(ckpt["config"]["model"])
    except ConfigError:
        old = ckpt["config"]["model"]
    diff = _first_difference(old, config["model"], "model")
    if diff:
        raise ConfigError(f"{path}: '{diff[0]}' is {diff[1]!r} in the checkpoint but {diff[2]!r} in the input; a "
                          f"restart continues the same model (start a new run from its weights with --init-model)")


def _check_steps(ckpt: dict, numb_steps: int, path) -> None:
    step = ckpt["step"]
    if numb_steps <= step:
        raise ConfigError(f"{path}: checkpoint is at step {step}; training.numb_steps={numb_steps} leaves nothing "
                          f"to train")


class Trainer:
    """One training run.  A new run refuses an output folder that holds another run (overwrite=True moves
    that run into <out_dir>/old-run-<time>/ when training starts); a restart continues its own run there."""

    def __init__(self, config: dict, *, restart: str | None = None, init_model: str | None = None,
                 finetune: str | None = None, out_dir: str | Path = ".", progress: bool = True,
                 overwrite: bool = False, skip_neighbor_stat: bool = False, loader_workers: int | None = None):
        pending = auto_sel_pending(config["model"]["descriptor"])
        if skip_neighbor_stat and pending and not (restart or init_model or finetune):
            raise ConfigError(f"'model.descriptor.sel' is {pending[0]!r}, which counts the neighbours in the training "
                              f"data; --skip-neighbor-stat skips that: give sel as a list, one count per type")
        self.device = training_device(config["training"]["device"])
        self.rank, self.world = _dist_info(self.device)
        self.out_dir = Path(out_dir)
        self.start_step = 0
        self.config = config
        tr = config["training"]
        self.prefix = self.out_dir / tr["save_ckpt"]
        ckpt = None
        if restart:
            ckpt = load_checkpoint(restart, for_restart=True)
            _check_restart(ckpt, config, restart)
            check_finite(ckpt["model"], restart)
        self.run_id = (ckpt.get("run_id") if ckpt else None) or new_run_id()
        self.last_saved = str(restart) if restart else None  # the last good checkpoint, for messages
        self._old_run = self._claim_out_dir(restart, overwrite)
        self.moved_to: Path | None = None
        mcfg = copy.deepcopy(config["model"])
        type_map = mcfg["type_map"]

        t0 = time.perf_counter()
        self.train_systems = load_systems(tr["training_data"]["systems"], type_map=type_map)
        self.valid_systems = (load_systems(tr["validation_data"]["systems"], type_map=type_map)
                              if tr["validation_data"] else None)
        rcut = config_rcut(mcfg["descriptor"])
        self.train_store = FrameStore(self.train_systems, rcut, device=self.device)
        self.valid_store = FrameStore(self.valid_systems, rcut, device=self.device) if self.valid_systems else None
        data = tr["training_data"]
        vdata = tr["validation_data"]
        # loader_workers: DeePMD-kit's DataLoader workers, whose count its frame sequence depends on (None: its rule,
        # NUM_WORKERS or min(4, cpus); a campaign fixes it so that where a member trains does not matter)
        self.sampler = BatchSampler(self.train_systems, data["batch_size"], data["auto_prob"], tr["seed"], self.world,
                                    data["sys_probs"], workers=loader_workers)
        self.valid_sampler = BatchSampler(self.valid_systems, vdata["batch_size"], vdata["auto_prob"], tr["seed"],
                                          sys_probs=vdata["sys_probs"],
                                          workers=self.sampler.workers) if self.valid_systems else None
        if tr["numb_epoch"] is not None:  # DeePMD-kit's count: whole epochs of the slowest-drawn system
            tr["numb_steps"] = math.ceil(tr["numb_epoch"] * self.sampler.epoch_steps())
        if ckpt is not None:
            _check_steps(ckpt, tr["numb_steps"], restart)

        if ckpt is not None:
            self.model = DeepPot(ckpt["model_config"])
            self.model.load_state_dict(ckpt["model"])
            self._take_params()
        elif init_model or finetune:
            self.model = self._from_weights(init_model or finetune, type_map)
            self._take_params()
            if finetune:  # DeePMD-kit's change-by-statistic: the bias follows the new data
                refit_energy_bias(self.model, self.train_systems, max_frames=mcfg["data_bias_nsample"])
        else:
            if pending:
                log.info(f"counting neighbours in the training data for sel {pending[0]!r} (a sel list skips this)")
                resolve_auto_sel(mcfg["descriptor"], lambda rc, mixed: self.train_store.max_neighbors(
                    len(type_map), rc, total=mixed))
                log.info(f"sel {[s['sel'] for s in sections(mcfg['descriptor'])]} (type_map {type_map})")
            if tr["mixed_precision"]:  # DeePMD-kit's: the nets' weights in output_prec
                set_precision(mcfg, tr["mixed_precision"]["output_prec"])
            self.model = DeepPot(mcfg)
            self._take_params()
        # statistics, training and validation frames come from one main generator, drawn as DeePMD-kit's
        # (dpmd/train/sampler.py; it counts DeePMD-kit systems: a mixed-type folder is one)
        self.sampler.main = main_generator(tr["seed"], len(self.sampler.group_frames),
                                           len(self.valid_sampler.group_frames) if self.valid_sampler else 0,
                                           self.model)
        if self.valid_sampler:
            self.valid_sampler.main = self.sampler.main
        if ckpt is None and not (init_model or finetune):
            self._statistics(mcfg)
        self.stat_seconds = time.perf_counter() - t0
        self.model.to(self.device)  # (statistics and bias came from the host's arrays)

        lr_cfg = config["learning_rate"]
        self.lr = learning_rate(lr_cfg, tr["numb_steps"])
        self.lr_scale = self.world if (self.world > 1 and lr_cfg["scale_by_worker"] == "linear") else (
            self.world ** 0.5 if self.world > 1 and lr_cfg["scale_by_worker"] == "sqrt" else 1.0)
        self.loss = EnergyLoss(config["loss"], lr_cfg["start_lr"])
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]
        self.compute_prec = tr["mixed_precision"]["compute_prec"] if tr["mixed_precision"] else None
        set_compute_precision(self.model, self.compute_prec)  # (saved and frozen models compute in output_prec)
        self.forces = _Forces(self.model)  # validation's (no gradient all-reduce)
        # every worker starts from rank 0's weights (DDP broadcasts them).  Every weight gets a gradient at every
        # step, a zero one where the batch lacks its type (the padding term and the empty type blocks are in the
        # graph): no find_unused_parameters search of the graph is needed
        self.train_forces = self.forces if self.world <= 1 else torch.nn.parallel.DistributedDataParallel(
            self.forces, device_ids=[self.device.index] if self.device.type == "cuda" else None, **_NO_BUFFER_SYNC)
        opt = config["optimizer"]
        self.optimizer = adam(self.trained_params, lr_cfg["start_lr"], opt["adam_beta1"], opt["adam_beta2"],
                              opt["weight_decay"])
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            # the batch order continues where it stopped when the data are the same (an exact restart); on new
            # data it starts afresh from the seed
            old = ckpt["config"]["training"]
            if old["training_data"] == data and old["seed"] == tr["seed"] and self.sampler.fits(ckpt["sampler"]):
                self.sampler.load_state_dict(ckpt["sampler"])
            if (self.valid_systems and old["validation_data"] == tr["validation_data"] and old["seed"] == tr["seed"]
                    and ckpt.get("valid_sampler") and self.valid_sampler.fits(ckpt["valid_sampler"])):
                self.valid_sampler.load_state_dict(ckpt["valid_sampler"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.start_step = ckpt["step"]
        self.progress = Progress(tr["numb_steps"], self.start_step, enabled=progress and self.rank == 0)

    def _statistics(self, mcfg: dict) -> None:
        """A fresh model's normalisation and energy bias from the frames DeePMD-kit's statistics read (the first
        data_stat_nbatch batches of a shuffle of each system, BatchSampler.statistics_frames), or from
        training.stat_file where it holds them (DeePMD-kit's layout, dpmd.train.stat_file: the descriptor's
        entries and the energy bias each read when complete, else computed and saved).  As in DeePMD-kit, the
        frames are drawn only when something is computed from them, so the training frames after them stay
        its frames either way; set_davg_zero keeps the mean at zero, as in DeePMD-kit."""
        tr, model = self.config["training"], self.model
        path, protection = tr["stat_file"], mcfg["data_stat_protect"]
        env, energy = stat_file.env_names(model), stat_file.energy_names(model)
        saved = stat_file.load(path, env + energy + [stat_file.observed_name(model)]) if path else {}
        stat_file.check_shapes(path, model, saved)
        missing = [name for name in env + energy if name not in saved]
        if missing and tr["stat_file_mode"] == "read":
            raise ConfigError(f"'training.stat_file' {path} holds no statistics of this model ({missing[0]}) and "
                              f"stat_file_mode is read")
        # DeePMD-kit samples when an entry is computed; the fparam / aparam normalisation always is here (its
        # fparam / aparam entries are not read), the observed types when a stat_file lacks them
        observed = not path or stat_file.observed_name(model) in saved
        if missing or model.fitting.numb_fparam or model.fitting.numb_aparam or not observed:
            frames = self.sampler.statistics_frames(mcfg["data_stat_nbatch"])
            systems = [s.subset(f) for s, f in zip(self.train_systems, frames) if f]
        else:
            systems = []
        param_stats(model, systems, max_frames=0, protection=protection)
        new = {}
        if all(name in saved for name in env):
            stat_file.set_env_stats(model, saved, protection)
        else:
            moments = descriptor_stats(model, systems, max_frames=0, protection=protection)
            if path:
                new.update(stat_file.env_items(model, moments))
        if all(name in saved for name in energy):
            with torch.no_grad():
                model.fitting.energy_bias.copy_(torch.as_tensor(saved[energy[0]].reshape(-1)))
        else:
            bias = energy_bias(model, systems, rcond=mcfg["fitting_net"]["rcond"])
            if path:
                new.update(stat_file.energy_items(model, systems, bias))
        if not observed:  # DeePMD-kit's read mode needs it
            new.update(stat_file.observed_item(model, systems))
        if new and tr["stat_file_mode"] == "update" and self.rank == 0:
            stat_file.save(path, new)
        with torch.no_grad():   # each descriptor's set_davg_zero (a hybrid's entries: each its own)
            for leaf, section in zip(stat_leaves(model.descriptor), sections(model.config["descriptor"])):
                if section.get("set_davg_zero"):
                    leaf.mean.zero_()

    def _take_params(self) -> None:
        for store in (self.train_store, self.valid_store):
            if store is not None:
                store.take_params(self.model.fitting)

    def _claim_out_dir(self, restart, overwrite: bool) -> list[Path]:
        """The files of another run in the output folder, to move aside before training (overwrite); without
        overwrite they are a one-line error.  A restart's own run in the folder is no conflict."""
        tr = self.config["training"]
        files = run_files(self.prefix, tr["disp_file"])
        if not files:
            return []
        if restart:
            # files from before run ids (None) claim nothing; an lcurve without checkpoints is this run's only
            # when the checkpoint restarted from lies in this folder
            has_checkpoints = any(p.name != tr["disp_file"] for p in files)
            here = Path(restart).parent.resolve() == self.out_dir.resolve()
            if folder_runs(self.prefix) - {None} <= {self.run_id} and (has_checkpoints or here):
                return []
        if overwrite:
            return files
        listed = ", ".join(p.name for p in files[:3])
        if restart:
            raise DpmdError(f"{self.out_dir}: holds another training run ({listed}), not the one of {restart}; "
                            f"restart into another -o folder, or pass --overwrite to move that run aside")
        try:
            hint = f"continue it with --restart {latest_checkpoint(self.out_dir)}, "
        except DpmdError:
            hint = ""
        raise DpmdError(f"{self.out_dir}: already holds a training run ({listed}); {hint}train into another -o "
                        f"folder, or pass --overwrite to move it aside")

    def _from_weights(self, path, type_map) -> DeepPot:
        # a frozen model, a dpmd training checkpoint or a DeePMD-kit checkpoint, read as plain data only, checked
        # for NaN weights
        model = load_model(path)
        if model.type_map != list(type_map):
            raise ConfigError(f"{path}: model type_map {model.type_map} differs from model.type_map {list(type_map)}")
        return model.train()

    # ------------------------------------------------------------------ steps
    def _step_loss(self, store, i, frames, lr, train=True):
        graph, label = store.batch(i, frames)
        pred = (self.train_forces if train else self.forces)(graph, create_graph=train)
        pred["virial"] = pred["virial"].reshape(-1, 9)
        if label["virial"] is not None:
            label["virial"] = label["virial"].reshape(-1, 9)
        return self.loss(pred, label, graph["natoms"], lr)

    def _validate(self, lr) -> dict:
        """DeePMD-kit's validation figures: each batch's RMSEs weighted by its atoms (atoms x frames)."""
        numb = self.config["training"]["validation_data"]["numb_btch"]
        sums: dict[str, float] = {}
        atoms = 0
        for _ in range(numb):
            i, frames = self.valid_sampler.next()
            _, metrics = self._step_loss(self.valid_store, i, frames, lr, train=False)
            weight = self.valid_systems[i].natoms * len(frames)
            atoms += weight
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * weight
        return {k: v / atoms for k, v in sums.items()}

    def _lcurve_columns(self, metrics) -> list[str]:
        cols = ["rmse"] + [k for k in ("rmse_e", "rmse_f", "rmse_v") if k in metrics]
        names = []
        for c in cols:
            names += ([f"{c}_val"] if self.valid_systems else []) + [f"{c}_trn"]
        return names

    def _open_lcurve(self, path: Path):
        """Append to lcurve, dropping lines past the restart step (a killed run may have written some)."""
        if self.start_step > 0 and path.is_file():
            kept = [ln for ln in path.read_text().splitlines(keepends=True)
                    if ln.startswith("#") or (ln.split() and int(ln.split()[0]) <= self.start_step)]
            atomic_write(path, lambda fh: fh.write("".join(kept)), mode="w")
            return path.open("a"), True
        return path.open("w"), False

    def _checkpoint_state(self, step: int) -> dict:
        """The run's state, host tensors only: a checkpoint written on a GPU restarts on a CPU and vice versa (the
        optimizer's load_state_dict moves its state to the weights' device)."""
        state = _on_host({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        return {"format": "dpmd-checkpoint", "version": 1, "run_id": self.run_id, "step": step, "config": self.config,
                "model_config": self.model.config, **state, "sampler": self.sampler.state_dict(),
                "valid_sampler": self.valid_sampler.state_dict() if self.valid_systems else None,
                "torch_rng": torch.get_rng_state()}

    def _finite_step(self, loss, step: int) -> None:
        """Stop before the optimizer step when the loss or the (averaged) gradients are not finite: the weights
        stay as they were and no checkpoint of them is written."""
        tr = self.config["training"]
        if tr["gradient_max_norm"]:
            norm = torch.nn.utils.clip_grad_norm_(self.trained_params, tr["gradient_max_norm"])
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                         for p in self.trained_params if p.grad is not None]))
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm)]).to(torch.float64)
        if self.world > 1:  # one worker's bad loss stops them all
            torch.distributed.all_reduce(bad)
        if not bad.any():
            return
        i, frames = self.sampler.last
        what = "loss" if bad[0] else "gradients"
        raise DpmdError(f"step {step}: non-finite {what} (loss {float(loss.detach()):.4g}) on frames {frames} of "
                        f"{self.train_systems[i].path}; training stopped before updating the weights, the last "
                        f"good checkpoint is {self.last_saved or 'none (none was written yet)'}")

    def _save(self, step: int) -> None:
        state = self._checkpoint_state(step)
        check_finite(state["model"], f"step {step}")  # never a checkpoint with NaN weights
        tr = self.config["training"]
        self.last_saved = str(save_checkpoint(state, self.prefix, step, tr["max_ckpt_keep"]))

    def run(self) -> dict:
        tr = self.config["training"]
        numb_steps, disp_freq, save_freq = tr["numb_steps"], tr["disp_freq"], tr["save_freq"]
        if self.rank == 0:
            if self._old_run:
                self.moved_to = move_aside(self._old_run, self.out_dir)
                self._old_run = []
                log.info(f"moved the previous run to {self.moved_to}")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tidy(self.prefix, tr["disp_file"])
        lcurve, header_written = (self._open_lcurve(self.out_dir / tr["disp_file"]) if self.rank == 0 else (None, True))
        self.model.train()
        last, reached = {}, self.start_step
        t_start = time.perf_counter()
        try:
            for step in range(self.start_step, numb_steps):
                lr = self.lr(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * self.lr_scale
                i, frames = self.sampler.next(self.rank)
                loss, metrics = self._step_loss(self.train_store, i, frames, lr)
                self.optimizer.zero_grad(set_to_none=True)
                # inputs=: only the weights' gradients (not the edge vectors', which would cost second
                # derivatives in the positions)
                loss.backward(inputs=self.trained_params)  # under DDP: the gradients averaged over the workers
                shown = step + 1
                self._finite_step(loss, shown)
                self.optimizer.step()
                reached = shown
                display = None
                if shown % disp_freq == 0 or shown == 1 or shown == numb_steps:  # (DeePMD-kit skips the last)
                    val = self._validate(lr) if self.valid_systems else {}
                    if self.rank == 0:
                        if not header_written:
                            cols = self._lcurve_columns(metrics)
                            lcurve.write("# " + f"{'step':>5s}" + "".join(f"{c:>14s}" for c in cols) + f"{'lr':>14s}\n")
                            header_written = True
                        values = []
                        for c in ["rmse"] + [k for k in ("rmse_e", "rmse_f", "rmse_v") if k in metrics]:
                            values += ([val[c]] if self.valid_systems else []) + [metrics[c]]
                        lcurve.write(f"{shown:7d}" + "".join(f"{v:14.6e}" for v in values) + f"{lr:14.6e}\n")
                        lcurve.flush()
                        display = f"lr {lr:.2e}  RMSE on the training batch: {describe_errors(metrics)}" + (
                            f"; on validation: {describe_errors(val)}" if val else "")
                    last = {"train": metrics, "valid": val, "lr": lr}
                if self.rank == 0 and (shown % save_freq == 0 or shown == numb_steps):
                    self._save(shown)
                self.progress.update(shown, display)
        finally:
            if lcurve is not None:
                lcurve.close()
        seconds = time.perf_counter() - t_start
        last["step"] = reached  # the step reached, for the final message
        last["seconds_per_step"] = seconds / max(reached - self.start_step, 1)
        last["startup_seconds"] = self.stat_seconds
        figures = (f"; last RMSE on the training batch: {describe_errors(last['train'])}" if last.get("train") else ""
                   ) + (f"; on validation: {describe_errors(last['valid'])}" if last.get("valid") else "")
        log.info(f"trained to step {reached}: {seconds:.1f} s, {last['seconds_per_step']:.3f} s/step, start-up "
                 f"{self.stat_seconds:.1f} s{figures}; checkpoint {self.last_saved}")
        if self.compute_prec and self.rank == 0:
            last["mixed_precision_force_error"] = self._mixed_precision_error()
        return last

    @torch.no_grad()
    def _mixed_precision_error(self) -> float:
        """RMS force difference (eV/Å) on the first training frame between the nets computing in compute_prec
        and the same weights in float64: what the mixed precision costs, logged."""
        graph, _ = self.train_store.batch(0, torch.tensor([0]))
        mixed = evaluate(self.model, graph)["force"]
        exact = copy.deepcopy(self.model).double()
        set_compute_precision(exact, None)
        graph = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in graph.items()}
        diff = float((mixed.double() - evaluate(exact, graph)["force"]).pow(2).mean().sqrt())
        log.info(f"mixed precision: the forces computed in {self.compute_prec} differ from float64 arithmetic by "
                 f"{diff:.3g} eV/Å (RMS, first training frame)")
        return diff
