"""Logging (issue 17): DeePMD-kit's -v/--log-level and -l/--log-path on every command; results on stdout, the
log on stderr and in the file; errors one line on stderr and in the file; only rank 0 logs; build progress."""

from __future__ import annotations

import logging
import sys

import pytest

from dpmd import log as dpmd_log
from dpmd.errors import DpmdError
from tests.conftest import EXAMPLE
from tests.test_bad_inputs_train import base_input, one_line_error, write_input
from tests.test_cli_options import dpmd


@pytest.fixture(autouse=True)
def _fresh_logging():
    yield
    dpmd_log.setup("INFO")   # the next test's console, no file of this test's tmp_path


def test_log_file_stdout_and_stderr(tmp_path, capsys):
    log = tmp_path / "logs" / "train.log"
    rc, out, err = dpmd(capsys, "train", write_input(tmp_path, base_input(steps=2)), "-o", tmp_path / "run",
                        "-l", log)
    assert rc == 0 and out == ""
    assert "trained to step 2:" in err and "eV/Å" in err
    lines = log.read_text().splitlines()
    assert lines[0].endswith(f"INFO    dpmd: dpmd train {tmp_path}/input.yaml -o {tmp_path}/run -l {log}  "
                             f"({lines[0].split('  (', 1)[1]}")   # the command line, then the versions
    assert any("dpmd.train.trainer: step 1/2" in line for line in lines)
    assert any("dpmd.train.trainer: trained to step 2:" in line for line in lines)
    assert all(line[:4].isdigit() and line[4] == "-" for line in lines)   # time-stamped
    rc, out, err = dpmd(capsys, "test", "-m", tmp_path / "run" / "model.ckpt.pt", "-s", EXAMPLE, "-n", "1",
                        "-l", log)
    assert rc == 0 and "F RMSE" in out and err == ""   # a command's results: stdout, not the log
    assert len(log.read_text().splitlines()) == len(lines) + 1   # appended: this command's line


def test_levels(tmp_path, capsys):
    inp = write_input(tmp_path, base_input(steps=1))
    rc, _, err = dpmd(capsys, "train", inp, "-o", tmp_path / "quiet", "-v", "WARNING")
    assert rc == 0 and err == "", err
    rc, _, err = dpmd(capsys, "train", inp, "-o", tmp_path / "one", "--log-level", "1")   # DeePMD-kit's numbers
    assert rc == 0 and err == "", err
    rc, _, err = dpmd(capsys, "freeze", "-c", tmp_path / "one", "-o", tmp_path / "m.pth", "-v")   # bare: DEBUG
    assert rc == 0 and logging.getLogger("dpmd").level == logging.DEBUG and "froze" in err


def test_errors_are_one_line_and_logged(tmp_path, capsys):
    log = tmp_path / "dpmd.log"
    rc, _, err = dpmd(capsys, "freeze", "-c", tmp_path / "nothing", "-l", log)
    line = one_line_error(rc, err, "dpmd freeze: error:", "nothing")
    assert log.read_text().splitlines()[-1].endswith("ERROR   dpmd: " + line.split(": ", 1)[1])
    (tmp_path / "dir").mkdir()
    rc, _, err = dpmd(capsys, "freeze", "-l", tmp_path / "dir")
    one_line_error(rc, err, f"{tmp_path / 'dir'}: cannot write the log file")


def test_only_rank_0_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    dpmd_log.setup("DEBUG", tmp_path / "rank1.log")
    logging.getLogger("dpmd.md").warning("from rank 1")
    assert capsys.readouterr().err == "" and not (tmp_path / "rank1.log").exists()
    monkeypatch.setenv("PMI_RANK", "0")
    dpmd_log.setup("INFO", tmp_path / "rank0.log")
    logging.getLogger("dpmd.md").warning("from rank 0")
    assert capsys.readouterr().err == "warning: from rank 0\n"
    assert "WARNING dpmd.md: from rank 0" in (tmp_path / "rank0.log").read_text()


def test_setup_names_other_loggers(tmp_path, capsys):
    """elt logs its campaign through the same helper (campaign.log in its work_dir)."""
    dpmd_log.setup("INFO", tmp_path / "campaign.log", names=("dpmd", "explore_label_train"))
    logging.getLogger("explore_label_train.campaign").info("iteration 0")
    logging.getLogger("dpmd.train.trainer").info("step 1/2")
    assert capsys.readouterr().err == "iteration 0\nstep 1/2\n"
    assert (tmp_path / "campaign.log").read_text().count("\n") == 2
    dpmd_log.setup("INFO", names=("dpmd", "explore_label_train"))


def _fake_build(tmp_path, lines: list[str], rc: int) -> list[str]:
    script = tmp_path / "fake_ninja.py"
    script.write_text(f"import sys\nfor line in {lines!r}:\n    print(line, flush=True)\nsys.exit({rc})\n")
    return [sys.executable, str(script)]


def test_build_progress_names_each_compiled_file(tmp_path, capsys):
    from dpmd.ops.build import _run_logged

    ninja = ["[1/3] c++ -MMD -MF a.o.d -O3 -c /src/csrc/kernels/env_mat.cc -o env_mat.o",
             "/src/csrc/kernels/env_mat.cc:3:1: warning: unused variable",
             "[2/3] c++ -MMD -c /src/csrc/torch/ops.cpp -o ops.o",
             "[3/3] c++ env_mat.o ops.o -shared -o dpmd_ops.so"]
    dpmd_log.setup("INFO")
    _run_logged(_fake_build(tmp_path, ninja, 0))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["compiled env_mat.cc", "compiled ops.cpp", "linked the library"]
    assert lines[0].startswith("compiled env_mat.cc (1/3, ") and lines[0].endswith(" s)")
    dpmd_log.setup("DEBUG")   # the compiler's messages too
    _run_logged(_fake_build(tmp_path, ninja, 0))
    assert "debug: /src/csrc/kernels/env_mat.cc:3:1: warning: unused variable" in capsys.readouterr().err
    failing = ["[1/2] c++ -c /src/a.cc -o a.o", "/src/b.cc:7:3: error: 'x' was not declared in this scope",
               "ninja: build stopped: subcommand failed.", "Traceback (most recent call last):",
               "RuntimeError: Error building extension 'dpmd_ops'"]
    with pytest.raises(RuntimeError) as err:
        _run_logged(_fake_build(tmp_path, failing, 1))
    assert str(err.value).splitlines()[-1] == "/src/b.cc:7:3: error: 'x' was not declared in this scope"


def test_setup_refuses_an_unknown_level():
    with pytest.raises(KeyError):
        dpmd_log.setup("LOUD")
    with pytest.raises(DpmdError):
        dpmd_log.setup("INFO", "/proc/no/such/dir/x.log")


def test_elt_run_writes_campaign_log(tmp_path, capsys, monkeypatch):
    """`elt run` appends its command line, the campaign's progress and its one-line errors to
    <work_dir>/campaign.log (a campaign runs for days), and still prints the error on stderr."""
    from explore_label_train.campaign import Campaign, CampaignError
    from explore_label_train.cli import main as elt_main
    from tests.test_elt import campaign_dict, write_campaign

    path = write_campaign(tmp_path, campaign_dict(tmp_path))
    work_dir = tmp_path / "camp"

    def progress(self, started):   # as Campaign.run: the log starts once the work_dir is checked
        started()
        self.log("[iteration 0] labelling 16 frames")
        return "max_iterations"

    monkeypatch.setattr(Campaign, "run", progress)
    assert elt_main(["run", str(path)]) == 0
    assert "[iteration 0] labelling 16 frames" in capsys.readouterr().err
    log = (work_dir / "campaign.log").read_text().splitlines()
    assert log[0].endswith(f"INFO    explore_label_train: elt run {path}")
    assert log[1].endswith("INFO    explore_label_train: [iteration 0] labelling 16 frames")

    def fail(self, started):
        started()
        raise CampaignError("i000-label-0003: labeller crashed")

    monkeypatch.setattr(Campaign, "run", fail)
    rc, err = elt_main(["run", str(path)]), capsys.readouterr().err
    assert rc == 1 and err == "elt run: error: i000-label-0003: labeller crashed\n"
    log = (work_dir / "campaign.log").read_text().splitlines()
    assert len(log) == 4 and log[-1].endswith("ERROR   explore_label_train: error: i000-label-0003: labeller crashed")
