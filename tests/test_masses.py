"""Masses per element: `masses: {H: 2.014}` (deuterium) in a `dpmd md` input and in a campaign file;
the other elements keep ASE's standard masses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_model
from dpmd.errors import ConfigError
from dpmd.md import Simulation, normalize_md_config
from dpmd.md.config import build_simulation
from dpmd.md.units import MVV2E
from dpmd.model import save_model
from explore_label_train.config import load_campaign
from tests.test_elt import campaign_dict, write_campaign
from tests.test_md import gas, small_water


def test_four_times_the_mass_walks_the_same_path_twice_as_slowly():
    """Masses x4, velocities / 2, timestep x2: velocity Verlet gives the same positions step for step (the
    dynamics sqrt(4) = 2 times slower); kinetic energy and temperature are those of the given masses."""
    pos, sym, box = gas(nframes=1)
    model = make_model()
    kw = dict(ensemble="nve", temperature=300, seed=4, thermo_freq=0, log=None)
    light = Simulation(model, pos[0], sym, box, timestep=1.0, **kw)
    heavy = Simulation(model, pos[0], sym, box, timestep=2.0, masses={"O": 4 * 15.999},
                       velocities=light.state.velocities / 2, **kw)
    assert torch.all(heavy.state.masses == 4 * 15.999)
    th = heavy.thermo()
    ke = 0.5 * MVV2E * 4 * 15.999 * float((heavy.state.velocities ** 2).sum())
    np.testing.assert_allclose([th["ke"][0], th["temp"][0]], [ke, 300.0], rtol=1e-12)
    light.run(30)
    heavy.run(30)
    assert torch.allclose(light.state.positions, heavy.state.positions, rtol=0, atol=1e-10)


def test_deuterated_water_from_the_md_input(tmp_path):
    """`masses: {H: 2.014}`: the H atoms weigh 2.014, O keeps ASE's mass; from rest, the first step moves each
    D atom m_D / m_H times less than H under the same force, and O alike."""
    from ase import Atoms
    from ase.io import write

    pos, sym, box = small_water()
    write(tmp_path / "water.extxyz", Atoms(sym, positions=pos, cell=box, pbc=True))
    save_model(make_model(), tmp_path / "m.pth")
    sims = {}
    for name, masses in (("H2O", None), ("D2O", {"H": 2.014})):
        cfg = {"structure": str(tmp_path / "water.extxyz"), "models": [str(tmp_path / "m.pth")], "steps": 1,
               "temperature": 0, "output_dir": str(tmp_path / name), "masses": masses}
        sims[name] = build_simulation(normalize_md_config(cfg), log=None)
    h = np.array(sym) == "H"
    m_h, m_d = sims["H2O"].state.masses[0].numpy(), sims["D2O"].state.masses[0].numpy()
    assert np.all(m_d[h] == 2.014) and np.all(m_d[~h] == m_h[~h]) and np.allclose(m_h[h], 1.008)
    moved = {}
    for name, sim in sims.items():
        start = sim.state.positions[0].clone()
        sim.run()
        sim.close()
        moved[name] = (sim.state.positions[0] - start).norm(dim=-1).numpy()
    assert moved["H2O"][h].min() > 1e-6
    np.testing.assert_allclose(moved["H2O"][h] / moved["D2O"][h], 2.014 / m_h[h], rtol=1e-9)
    np.testing.assert_allclose(moved["H2O"][~h], moved["D2O"][~h], rtol=1e-9)


@pytest.mark.parametrize("masses, message", [
    ({"H": -1.0}, "'masses.H' must be positive, got -1.0"),
    ({"H": float("nan")}, "'masses.H' must be a finite number, got "),
    ([15.999, 2.014], "masses: expected element: mass in amu, e.g. {H: 2.014}, got [15.999, 2.014]"),
])
def test_bad_md_masses_are_one_line_errors(masses, message):
    with pytest.raises(ConfigError) as err:
        normalize_md_config({"structure": "x.xyz", "models": ["m.pth"], "steps": 1, "masses": masses})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_md_masses_of_an_element_the_model_lacks(tmp_path, capsys):
    import yaml

    from dpmd.cli import main

    save_model(make_model(), tmp_path / "m.pth")
    (tmp_path / "in.yaml").write_text(yaml.safe_dump({"structure": "x.xyz", "models": [str(tmp_path / "m.pth")],
                                                      "steps": 1, "masses": {"D": 2.014}}))
    assert main(["md", str(tmp_path / "in.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "masses: D is not in the type_map ['O', 'H']" in err


def test_campaign_masses(tmp_path):
    """The exploration MD's masses, in type_map order: ASE's, or those given per element."""
    assert load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path)))["masses"] == [63.546]
    cfg = load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path, masses={"Cu": 65.0})))
    assert cfg["masses"] == [65.0]
    for masses, message in (({"Au": 197.0}, "masses: Au is not in the type_map ['Cu']"),
                            ({"Cu": 0}, "'masses.Cu' must be positive, got 0")):
        path = write_campaign(tmp_path, campaign_dict(tmp_path, masses=masses))
        with pytest.raises(ConfigError, match=rf"^{path}: {message}$".replace("[", r"\[").replace("]", r"\]")):
            load_campaign(path)
