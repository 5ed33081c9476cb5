"""The `elt` command: run / status / report an explore–label–train campaign.

    elt run campaign.yaml [--move-aside] [--threads N]   # starts, or resumes where it stopped (nothing
                                                         # finished is redone); N: cores it uses at once
    elt status [campaign.yaml | campaign_dir]
    elt report [campaign.yaml | campaign_dir] [-o DIR]
    elt import-dpgen param.json [machine.json] [-o campaign.yaml] [--force]   # a DP-GEN run as a campaign file

Every failure prints one line and exits 1: `elt <cmd>: error: ...` for what the user can fix,
`elt <cmd>: internal error: ...` for anything else (DPMD_DEBUG=1 or ELT_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sqlite3
import sys
from pathlib import Path

from dpmd import log as dpmd_log
from dpmd.errors import DpmdError
from dpmd.runtime import quiet_openmp, thread_count
from explore_label_train.state import RESTORE

LOGGERS = ("dpmd", "explore_label_train")
log = logging.getLogger("explore_label_train")


def _db_path(target: str, args) -> Path:
    p = Path(target)
    if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
        from explore_label_train.config import load_campaign

        p = Path(load_campaign(p)["work_dir"])
    db = p / "campaign.db" if p.is_dir() else p
    if not db.is_file():
        raise DpmdError(f"{target}: no campaign found (expected a campaign file or a directory holding campaign.db)")
    args.db = db
    return db


def _run(args) -> None:
    from explore_label_train.campaign import Campaign, move_aside
    from explore_label_train.config import load_campaign

    cfg = load_campaign(args.campaign)
    if args.threads:
        cfg["threads"] = args.threads
    args.db = Path(cfg["work_dir"]) / "campaign.db"
    if args.move_aside:
        inputs = cfg["initial"]["data"] + [f for s in cfg["structures"].values()
                                           for f in [s["file"], *(s["files"] or [])] if f]
        moved = move_aside(Path(cfg["work_dir"]), inputs)
        print(f"moved the earlier campaign files to {moved}" if moved else "nothing to move aside; starting fresh")
    campaign = Campaign(cfg, log=log.info)

    def start_log():   # a campaign runs for days: its progress also goes to <work_dir>/campaign.log, appended
        dpmd_log.setup(args.log_level, args.log_path, names=LOGGERS, more_paths=[campaign.root / "campaign.log"])
        dpmd_log.file_only(log, logging.INFO, f"elt {shlex.join(sys.argv[1:] if args.argv is None else args.argv)}")

    decision = campaign.run(started=start_log)
    from explore_label_train.report import status_table

    print(status_table(campaign.state))
    print(f"finished: {decision}; campaign directory {cfg['work_dir']}")


def _status(args) -> None:
    from explore_label_train.report import status_table
    from explore_label_train.state import State

    state = State(_db_path(args.campaign, args))
    print(status_table(state))


def _report(args) -> None:
    from explore_label_train.report import write_report
    from explore_label_train.state import State

    db = _db_path(args.campaign, args)
    out = Path(args.output) if args.output else db.parent / "report"
    page = write_report(State(db), out)
    print(f"wrote {page}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elt", description="explore-label-train active learning with dpmd")
    sub = parser.add_subparsers(dest="command", required=True)
    logging_options = argparse.ArgumentParser(add_help=False)
    dpmd_log.add_arguments(logging_options)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[logging_options])

    p = command("run", "run (or resume) a campaign; progress also goes to <work_dir>/campaign.log")
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--move-aside", action="store_true",
                   help="first move the work_dir's campaign files (campaign.db, iter.*, labels, data, dispatch, "
                        "report) into <work_dir>/old-<time>/ and start a fresh campaign; nothing is deleted")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="cores the campaign uses at once (default: the campaign's threads key, else every core this "
                        "process may use); small models train one member per core")
    p.set_defaults(func=_run)
    p = command("status", "iterations, stages, tasks, labels and deviation classes")
    p.add_argument("campaign", nargs="?", default=".", help="campaign YAML or its directory (default: .)")
    p.set_defaults(func=_status)
    p = command("report", "PNG plots and an HTML page")
    p.add_argument("campaign", nargs="?", default=".", help="campaign YAML or its directory (default: .)")
    p.add_argument("-o", "--output", help="output directory (default: <campaign dir>/report)")
    p.set_defaults(func=_report)
    from explore_label_train import dpgen_import

    p = command("import-dpgen", "a DP-GEN run (param.json [machine.json]) as a campaign file")
    dpgen_import.add_arguments(p)
    p.set_defaults(func=dpgen_import.run)
    return parser


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


def main(argv=None) -> int:
    quiet_openmp()   # before torch (or a labeller's OpenMP) loads, here and in every worker process
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        dpmd_log.setup(args.log_level, args.log_path, names=LOGGERS)
        args.func(args)
    except Exception as err:  # noqa: BLE001 - every failure is one line; the traceback only on request
        if os.environ.get("DPMD_DEBUG") or os.environ.get("ELT_DEBUG"):
            raise
        if isinstance(err, (DpmdError, ValueError, OSError)):
            message = f"error: {_first_line(err)}"
        elif isinstance(err, sqlite3.DatabaseError):   # a database that broke after it was opened and checked
            message = f"error: {getattr(args, 'db', 'campaign.db')}: {_first_line(err)}; {RESTORE}"
        else:
            message = (f"internal error: {type(err).__name__}: {_first_line(err)} "
                       f"(set DPMD_DEBUG=1 for the traceback)")
        print(f"elt {args.command}: {message}", file=sys.stderr)
        dpmd_log.file_only(log, logging.ERROR, message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
