"""The `elt` command: run / status / report an explore–label–train campaign.

    elt run campaign.yaml          # starts, or resumes where it stopped (nothing finished is redone)
    elt status [campaign.yaml | campaign_dir]
    elt report [campaign.yaml | campaign_dir] [-o DIR]

Errors meant for users print as one line (ELT_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpmd.errors import DpmdError


def _db_path(target: str) -> Path:
    p = Path(target)
    if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
        from explore_label_train.config import load_campaign

        p = Path(load_campaign(p)["work_dir"])
    db = p / "campaign.db" if p.is_dir() else p
    if not db.is_file():
        raise DpmdError(f"{target}: no campaign found (expected a campaign file or a directory holding campaign.db)")
    return db


def _run(args) -> None:
    from explore_label_train.campaign import Campaign
    from explore_label_train.config import load_campaign

    cfg = load_campaign(args.campaign)
    campaign = Campaign(cfg)
    decision = campaign.run()
    from explore_label_train.report import status_table

    print(status_table(campaign.state))
    print(f"finished: {decision}; campaign directory {cfg['work_dir']}")


def _status(args) -> None:
    from explore_label_train.report import status_table
    from explore_label_train.state import State

    state = State(_db_path(args.campaign))
    print(status_table(state))


def _report(args) -> None:
    from explore_label_train.report import write_report
    from explore_label_train.state import State

    db = _db_path(args.campaign)
    out = Path(args.output) if args.output else db.parent / "report"
    page = write_report(State(db), out)
    print(f"wrote {page}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elt", description="explore-label-train active learning with dpmd")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a campaign")
    p.add_argument("campaign", help="campaign YAML file")
    p.set_defaults(func=_run)
    p = sub.add_parser("status", help="iterations, stages, tasks, labels and deviation classes")
    p.add_argument("campaign", nargs="?", default=".", help="campaign YAML or its directory (default: .)")
    p.set_defaults(func=_status)
    p = sub.add_parser("report", help="PNG plots and an HTML page")
    p.add_argument("campaign", nargs="?", default=".", help="campaign YAML or its directory (default: .)")
    p.add_argument("-o", "--output", help="output directory (default: <campaign dir>/report)")
    p.set_defaults(func=_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DpmdError, ValueError, OSError) as err:
        if os.environ.get("ELT_DEBUG"):
            raise
        print(f"elt {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
