"""The new descriptor types in data-parallel training and in a whole `elt` campaign (issue 20 item 4).

DDP: 2 gloo workers x batch 1 train the same weights as 1 process x batch 2 (tests/test_train.py's check for
se_e2_a), for every new descriptor type.  Campaign: a tiny EMT Cu campaign whose models use the descriptor trains,
explores, selects, labels and retrains; the deviations it recorded are those of its frozen models evaluated
directly on the explored frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import EXAMPLE, REPO

SMALL = {"rcut": 4.0, "rcut_smth": 0.5, "sel": "auto", "seed": 1}
ATTENTION = {**SMALL, "neuron": [4, 8], "axis_neuron": 4, "tebd_dim": 4, "attn": 8, "attn_layer": 1}
DESCRIPTORS = {
    "se_e2_r": {"type": "se_e2_r", **SMALL, "neuron": [4, 8]},
    "se_e3": {"type": "se_e3", **SMALL, "rcut": 3.5, "neuron": [4, 8]},
    "se_atten": {"type": "se_atten", **ATTENTION},          # DeePMD-kit's defaults: attn_dotr, plain softmax
    "se_atten_v2": {"type": "se_atten_v2", **ATTENTION},
    # a per-type and a mixed-type descriptor with different cut-offs
    "hybrid": {"type": "hybrid", "list": [{"type": "se_e2_r", **SMALL, "neuron": [4, 8]},
                                          {"type": "se_atten", **ATTENTION, "rcut": 3.5, "seed": 2}]},
}
STEPS = 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
# one process trains every folder given (the interpreter and torch start once for all descriptor types)
TRAIN_ALL = ("import sys\nfrom dpmd.cli import main\n"
             "sys.exit(max(main(['train', d + '/input.json', '-o', d, '--threads', '1']) for d in sys.argv[1:]))\n")


def train_input(descriptor: dict, batch_size: int) -> dict:
    return {"model": {"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": {"neuron": [8, 8], "seed": 1}},
            # the same learning rate for 1 and 2 workers: the same update from the same averaged gradient
            "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-5, "decay_steps": 10,
                              "scale_by_worker": "none"},
            "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": batch_size},
                         "numb_steps": STEPS, "seed": 7, "disp_freq": 1, "save_freq": 1, "device": "cpu"}}


def quintic_switch_is_accurate_near_rcut() -> bool:
    """Whether the descriptors' switch keeps its relative accuracy a few 1e-5 Å inside rcut, where DeePMD-kit's
    form u^3 (-6 u^2 + 15 u - 10) + 1 cancels to ~1e-13 with an absolute rounding of ~1e-16.  se_atten's
    attn_dotr normalises the environment rows' direction (F.normalize), whose 1e-12 clamp leaves such a tiny row
    un-normalised: its ~1e-3 relative rounding then reaches the forces of the pair (1e-7 to 1e-5 eV/Å on liquid
    water, where some pair always lies that close to rcut), and 2 workers and 1 process, which sum in different
    orders, train apart by ~1e-10 in 4 steps (with the factored form (1 - u)^3 (1 + 3 u + 6 u^2): ~1e-16)."""
    from dpmd.model.descriptor import smooth_switch

    u = 1.0 - torch.tensor([1e-5, 3e-5, 7e-5], dtype=torch.float64)
    exact = (1.0 - u) ** 3 * (1.0 + 3.0 * u + 6.0 * u * u)
    return bool(torch.allclose(smooth_switch(u, 0.0, 1.0), exact, rtol=1e-9, atol=0.0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{kind: (folder of the 2-worker run, folder of the 1-process run)}: each descriptor trained STEPS steps by
    torchrun's 2 gloo workers at batch 1, and by one process at batch 2."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "train_all.py").write_text(TRAIN_ALL)
    runs = {}
    for kind, descriptor in DESCRIPTORS.items():
        runs[kind] = (root / "ddp" / kind, root / "one" / kind)
        for d, batch in zip(runs[kind], (1, 2)):
            d.mkdir(parents=True)
            (d / "input.json").write_text(json.dumps(train_input(descriptor, batch)))
    for mode, launcher in (("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
                           ("one", [])):
        proc = subprocess.run([sys.executable, *launcher, str(root / "train_all.py"), *DESCRIPTORS], cwd=root / mode,
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return runs


def lcurve(folder):
    return np.loadtxt(folder / "lcurve.out", ndmin=2)


@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.xfail(k == "se_atten" and not quintic_switch_is_accurate_near_rcut(),
                                            reason="the switch's rounding near rcut reaches se_atten's forces "
                                                   "(quintic_switch_is_accurate_near_rcut)", strict=False))
    for k in DESCRIPTORS])
def test_two_workers_train_the_weights_of_one_process_with_their_global_batch(trained, kind):
    from dpmd.model import load_model

    ddp, one = trained[kind]
    assert load_model(ddp / f"model.ckpt-{STEPS}.pt").config["descriptor"]["type"] == kind
    a = torch.load(ddp / f"model.ckpt-{STEPS}.pt", weights_only=True)["model"]
    b = torch.load(one / f"model.ckpt-{STEPS}.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    # each worker trained on its own frame: rank 0's training RMSEs (lcurve) are those of half the batch
    assert not np.allclose(lcurve(ddp)[:, 1:], lcurve(one)[:, 1:], rtol=1e-6, atol=0)
    first = torch.load(one / "model.ckpt-1.pt", weights_only=True)["model"]
    assert any(not torch.equal(first[k], v) for k, v in b.items())   # the weights moved after the first step
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11, msg=lambda m: f"{kind}: {k}: {m}")


# ---------------------------------------------------------------------------------------------- elt campaign
CAMPAIGN_DESCRIPTORS = {
    "se_atten_v2": {"type": "se_atten_v2", "sel": "auto", "rcut": 4.5, "rcut_smth": 0.5, "neuron": [4, 8],
                    "axis_neuron": 4, "tebd_dim": 4, "attn": 8, "attn_layer": 1},
    "se_e2_r": {"type": "se_e2_r", "sel": "auto", "rcut": 4.5, "rcut_smth": 0.5, "neuron": [4, 8]},
}


def campaign(tmp_path, descriptor: dict) -> dict:
    """tests/test_elt.py's EMT Cu campaign (4 atoms, 2 members, 2 iterations) with `descriptor`."""
    return {
        "work_dir": str(tmp_path / "camp"), "type_map": ["Cu"], "threads": 1,
        "structures": {"fcc": {"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True}},
        "initial": {"structures": ["fcc"], "perturb": 4, "displacement": 0.05, "cell_strain": 0.02},
        "train": {"ensemble_size": 2, "numb_steps": 20, "reuse_numb_steps": 10, "template": {
            "model": {"descriptor": descriptor, "fitting_net": {"neuron": [8, 8]}},
            "learning_rate": {"start_lr": 0.002, "stop_lr": 1e-5, "decay_steps": 5},
            "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": {"training_data": {"batch_size": 1}}}},
        "explore": [{"name": "nvt", "structures": ["fcc"], "ensemble": "nvt", "temperatures": [300, 800],
                     "steps": 20, "traj_interval": 10, "timestep": 2.0}],
        "trust": {"lo": 0.0, "hi": 50.0},          # every frame is a candidate: selection is budget-bound
        "select": {"budget": 2},
        "filters": {"min_distance": 1.5},
        "labeller": {"calculator": "emt"},
        "dispatcher": {"workers": 1, "timeout": 60},
        "convergence": {"accurate_ratio": 0.99, "max_iterations": 2, "max_labels": 100},
    }


@pytest.mark.parametrize("kind", list(CAMPAIGN_DESCRIPTORS))
def test_campaign_trains_explores_selects_labels_and_retrains_with_the_descriptor(tmp_path, kind):
    from dpmd.data import load_system
    from dpmd.model import load_model
    from explore_label_train.campaign import Campaign
    from explore_label_train.config import load_campaign

    path = tmp_path / "camp.yaml"
    path.write_text(yaml.safe_dump(campaign(tmp_path, CAMPAIGN_DESCRIPTORS[kind])))
    camp = Campaign(load_campaign(path), log=None)
    assert camp.run() == "max_iterations"
    st = camp.state
    its = st.q("SELECT * FROM iterations ORDER BY iteration")
    assert [r["iteration"] for r in its] == [0, 1] and all(r["status"] == "done" for r in its)
    models = {it: [load_model(camp.model_path(it, k)) for k in range(2)] for it in (0, 1)}
    assert all(m.config["descriptor"]["type"] == kind for ms in models.values() for m in ms)
    # exploration's frames labelled and in the data set the next iteration trained on
    explored = st.q("SELECT * FROM labels WHERE frame_id IS NOT NULL AND iteration = 0")
    assert len(explored) == 2                                               # the budget
    system = load_system(camp.root / "data" / "Cu4")
    assert system.nframes == st.one("SELECT COUNT(*) FROM labels")
    # iteration 1 retrained (from iteration 0's weights) on them: other weights, the same descriptor
    for old, new in zip(models[0], models[1]):
        assert any(not torch.equal(p, q) for p, q in zip(old.parameters(), new.parameters()))

    # every recorded deviation is that of the iteration's frozen models evaluated on the frame: DeePMD-kit's
    # definitions (dpmd/md/devi.py) computed here from their forces, virials and energies
    frames = st.q("SELECT * FROM frames ORDER BY frame_id")
    assert {r["iteration"] for r in frames} == {0, 1} and all(r["max_devi_f"] > 0 for r in frames)
    for r in frames:
        with np.load(camp.root / r["file"]) as z:
            coord, box = z["coord"][r["idx"]], z["box"][r["idx"]]
        n = len(coord)
        out = [m(torch.tensor(coord), torch.zeros(n, dtype=torch.long), torch.tensor(box))
               for m in models[r["iteration"]]]
        force = np.stack([o["force"].detach().numpy().reshape(n, 3) for o in out])
        virial = np.stack([o["virial"].detach().numpy().reshape(9) for o in out]) / n
        energy = np.array([float(o["energy"]) for o in out]) / n
        devi_f = np.sqrt(force.var(axis=0).sum(axis=-1))
        assert r["max_devi_f"] == pytest.approx(devi_f.max(), rel=1e-8, abs=1e-12)
        assert r["avg_devi_f"] == pytest.approx(devi_f.mean(), rel=1e-8, abs=1e-12)
        assert r["max_devi_v"] == pytest.approx(np.sqrt(virial.var(axis=0)).max(), rel=1e-8, abs=1e-12)
        assert r["devi_e"] == pytest.approx(energy.std(), rel=1e-8, abs=1e-12)
