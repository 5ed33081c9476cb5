"""The `dpmd` command.  Each subcommand lives with the code it drives; this file only routes.

Errors meant for users (DpmdError, bad values, missing files) print as one line.
Set DPMD_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from dpmd.errors import DpmdError


def _neighbor_stat(args) -> None:
    from dpmd.data import find_systems, load_systems
    from dpmd.geometry.neighbor import auto_sel, neighbor_stat

    paths = [p for root in args.systems for p in find_systems(root)]
    if not paths:
        raise DpmdError(f"no DeePMD systems (directories with type.raw) under {' '.join(args.systems)}")
    systems = load_systems(paths, type_map=args.type_map)
    type_map = args.type_map or systems[0].type_map
    frames = ((s.coord[f], s.atype, None if s.box is None else s.box[f]) for s in systems for f in range(s.nframes))
    max_counts, min_dist = neighbor_stat(frames, args.rcut, len(type_map))
    print(f"systems: {len(systems)}, frames: {sum(s.nframes for s in systems)}, rcut: {args.rcut}")
    print(f"type_map: {type_map}")
    print(f"min_nbor_dist: {min_dist:.6f}")
    print(f"max_nbor_size: {max_counts}")
    print(f"sel (auto = max x 1.1, multiple of 4): {auto_sel(max_counts)}")


def _demo(args) -> None:
    from dpmd.demo import run_demo

    run_demo(args.data, args.steps, args.seed)


def build_parser() -> argparse.ArgumentParser:
    from dpmd.data.convert import add_convert_arguments, run_convert

    parser = argparse.ArgumentParser(prog="dpmd", description="Deep-potential molecular dynamics")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("neighbor-stat", help="max neighbour count per type and min pair distance of datasets")
    p.add_argument("-s", "--systems", nargs="+", required=True, help="DeePMD systems or directories holding them")
    p.add_argument("-r", "--rcut", type=float, default=6.0, help="cutoff radius (Å)")
    p.add_argument("-t", "--type-map", nargs="+", default=None, help="element names, e.g. O H")
    p.set_defaults(func=_neighbor_stat)

    p = sub.add_parser("convert", help="convert DFT outputs into deepmd/npy (through dpdata)")
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)

    p = sub.add_parser("demo", help="the README's main job on the bundled water example")
    p.add_argument("--data", default=None, help="DeePMD system (default: examples/water/data_0)")
    p.add_argument("--steps", type=int, default=20, help="MD steps")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DpmdError, ValueError, OSError) as err:
        if os.environ.get("DPMD_DEBUG"):
            raise
        print(f"dpmd {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
