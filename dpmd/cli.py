"""The `dpmd` command.  Each subcommand lives with the code it drives; this file only routes.

A command's results go to stdout; progress and information go through logging (dpmd.log: stderr, and the
file of -l/--log-path).  Errors meant for users (DpmdError, bad values, missing files) print as one line.
Set DPMD_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys

from dpmd import log as dpmd_log
from dpmd.errors import DpmdError

logger = logging.getLogger("dpmd")


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


def _train(args) -> None:
    from dpmd.runtime import configure_threads, training_work
    from dpmd.train.config import read_input
    from dpmd.train.trainer import Trainer

    starts = [f"--{name.replace('_', '-')}" for name in ("restart", "init_model", "init_frz_model", "finetune")
              if getattr(args, name)]
    if len(starts) > 1:
        raise DpmdError(f"{starts[0]} and {starts[1]} start a run in different ways; give one")
    config = read_input(args.input, args.set + ([f"training.device={args.device}"] if args.device else []))
    configure_threads(args.threads, work=training_work(config))
    # a frozen model and a checkpoint are read by the same function (dpmd.model.load_model)
    trainer = Trainer(config, restart=args.restart, init_model=args.init_model or args.init_frz_model,
                      finetune=args.finetune, out_dir=args.output, overwrite=args.overwrite,
                      skip_neighbor_stat=args.skip_neighbor_stat)
    trainer.run()


def _freeze(args) -> None:
    from dpmd.train.freeze import freeze

    source = freeze(args.checkpoint, args.output)
    logger.info(f"froze {source} -> {args.output}")


def _convert_model(args) -> None:
    from dpmd.model import load_model, save_model

    save_model(load_model(args.input), args.output)
    logger.info(f"converted {args.input} ({args.source}) -> {args.output}")


def _compress(args) -> None:
    from dpmd.model.compress import compress_file
    from dpmd.train.config import read_input

    systems = None   # the training data's systems give the tables' range, unless --min-nbor-dist does
    if args.training_input and args.min_nbor_dist is None:
        systems = read_input(args.training_input)["training"]["training_data"]["systems"]
    spec = compress_file(args.input, args.output, step=args.step, extrapolate=args.extrapolate,
                         check_frequency=args.check_frequency, training_systems=systems,
                         min_nbor_dist=args.min_nbor_dist, systems_source=args.training_input or "the training data")
    layouts = spec.get("list", [spec])  # a hybrid's: one per descriptor
    tables = "; ".join(f"{lay['n_coarse_low'] + lay['n_coarse']} x {lay['step_coarse']:g} + {lay['n_fine']} x "
                       f"{lay['step']:g}" for lay in layouts)
    rmin = min(max(r) for r in zip(*(lay["rmin"] for lay in layouts)))  # per type, what every table covers
    logger.info(f"compressed {args.input} -> {args.output}: min_nbor_dist {spec['min_nbor_dist']:.4f} Å, table "
                f"intervals {tables}, covering r >= {rmin:.4f} Å")


def _md(args) -> None:
    from dpmd.md import run_md
    from dpmd.md.config import read_md_input

    result = run_md(read_md_input(args.input, args.set), restart=args.restart, threads=args.threads)
    logger.info(f"md: {result['steps']} steps to step {result['final_step']}: {result['steps_per_second']:.2f} "
                f"steps/s, {result['ns_per_day']:.3f} ns/day, {result['neighbor_builds']} neighbour-list builds")


def _doc_train_input(args) -> None:
    from dpmd import schema
    from dpmd.train.config import TRAIN_ARGS

    write = {"rst": schema.doc_text, "json": schema.doc_json, "json_schema": schema.json_schema}[args.out_type]
    print(write(TRAIN_ARGS))


def version() -> str:
    """dpmd's version (and torch's, Python's), without importing torch."""
    from importlib.metadata import PackageNotFoundError, version as installed

    def of(package):
        try:
            return installed(package)
        except PackageNotFoundError:
            return "unknown"

    return f"dpmd {of('dpmd')} (torch {of('torch')}, Python {sys.version.split()[0]})"


def _build_ops(args) -> None:
    from dpmd import ops

    try:
        path = ops.build()
    except (RuntimeError, ImportError, subprocess.CalledProcessError) as err:  # compiler/ninja output is long
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise DpmdError(f"building the kernel library failed: {lines[-1] if lines else type(err).__name__} "
                        f"(rerun with -v for the compiler's messages)") from None
    print(path)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    from dpmd.data.convert import add_convert_arguments, run_convert
    from dpmd.runtime import thread_count

    parser = argparse.ArgumentParser(prog="dpmd", description="Deep-potential molecular dynamics")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    logging_options = argparse.ArgumentParser(add_help=False)
    dpmd_log.add_arguments(logging_options)
    logging_options.add_argument("--threads", type=thread_count, default=None, metavar="N",
                                 help="threads for tensor work (default: one per 1,000 atoms of a model "
                                      "evaluation, at most the cores this process may use)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        """A subcommand with the logging options every command has (as in DeePMD-kit)."""
        return sub.add_parser(name, help=help, description=help, parents=[logging_options])

    p = command("neighbor-stat", "max neighbour count per type and min pair distance of datasets")
    p.add_argument("-s", "--systems", nargs="+", required=True, help="DeePMD systems or directories holding them")
    p.add_argument("-r", "--rcut", type=float, default=6.0, help="cutoff radius (Å)")
    p.add_argument("-t", "--type-map", nargs="+", default=None, help="element names, e.g. O H")
    p.set_defaults(func=_neighbor_stat)

    p = command("convert", "convert DFT outputs into deepmd/npy (through dpdata)")
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)

    p = command("train", "train a model from a YAML or JSON input (DeePMD-kit keys)")
    p.add_argument("input", help="input.yaml or input.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set training.numb_steps=200 (repeatable)")
    p.add_argument("-r", "--restart", help="continue the run of this checkpoint")
    p.add_argument("-i", "--init-model", help="start a new run from the weights of a checkpoint or model file")
    p.add_argument("-f", "--init-frz-model", help="start a new run from the weights of a frozen model (the same as "
                                                  "--init-model, which reads frozen models too)")
    p.add_argument("-t", "--finetune", help="like --init-model, re-fitting the energy bias on the new data")
    p.add_argument("--skip-neighbor-stat", action="store_true",
                   help="do not count neighbours in the training data: model.descriptor.sel must then be a list, "
                        "not 'auto' (dpmd counts them only for sel 'auto')")
    p.add_argument("-o", "--output", default=".", help="directory for lcurve.out and checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="a new run in a folder holding another run moves that run into old-run-<time>/ there")
    p.add_argument("--device", metavar="DEV", help="where to train: auto, cpu, cuda or cuda:N (overrides "
                                                   "training.device; default auto: cuda when torch sees a GPU; under "
                                                   "torchrun each worker takes cuda:LOCAL_RANK)")
    p.set_defaults(func=_train)

    p = command("doc-train-input", "every key of the training input, with its default and doc "
                                   "(like dp doc-train-input)")
    p.add_argument("--out-type", default="rst", choices=["rst", "json", "json_schema"],
                   help="rst: text (default); json: the keys as dargs JSON; json_schema: a JSON schema for editors")
    p.set_defaults(func=_doc_train_input)

    p = command("freeze", "checkpoint -> self-contained model file")
    p.add_argument("-c", "--checkpoint-folder", "--checkpoint", dest="checkpoint", default=None,
                   help="checkpoint file, or a folder: its latest checkpoint (default: the latest in .)")
    p.add_argument("-o", "--output", default="frozen_model.pth", help="the model file to write")
    p.set_defaults(func=_freeze)

    from dpmd import model_devi, show
    from dpmd.train import change_bias
    from dpmd.train import test as test_cmd

    for name, text, module in (   # commands whose module defines add_arguments(parser) and run(args)
            ("test", "energy/force/virial errors of a model on labelled data (like dp test)", test_cmd),
            ("model-devi", "deviation of several models over the frames of datasets (like dp model-devi)", model_devi),
            ("change-bias", "re-fit or set a model's per-type energy bias (like dp change-bias)", change_bias),
            ("show", "a model's type_map, config sections, size, observed types (like dp show)", show)):
        p = command(name, text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    for entry in entry_points(group="dpmd.commands"):   # commands of installed packages (elt's `dpmd demo`)
        module = entry.load()
        p = command(entry.name, module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    p = command("convert-model", "import a DeePMD-kit (PyTorch) checkpoint (se_e2_a, se_e2_r, se_e3, se_atten, "
                "se_atten_v2, hybrid)")
    p.add_argument("--from", dest="source", default="deepmd", choices=["deepmd"],
                   help="what wrote the input: deepmd (DeePMD-kit 3's PyTorch backend, model.ckpt-*.pt)")
    p.add_argument("-i", "--input", required=True, help="the DeePMD-kit checkpoint")
    p.add_argument("-o", "--output", required=True, help="the dpmd model file to write (frozen, .pth)")
    p.set_defaults(func=_convert_model)

    p = command("compress", "tabulate the embedding nets (like dp compress); writes a frozen model")
    p.add_argument("-i", "--input", default="frozen_model.pth",
                   help="model file (frozen, dict or DeePMD-kit checkpoint)")
    p.add_argument("-o", "--output", default="frozen_model_compressed.pth", help="the compressed model file to write")
    p.add_argument("-t", "--training-input", default=None,
                   help="training input (YAML/JSON): its training systems give min_nbor_dist")
    p.add_argument("--min-nbor-dist", type=float, default=None, help="smallest neighbour distance (Å) instead of -t")
    p.add_argument("-s", "--step", type=float, default=0.01,
                   help="table step of the embedding nets' input (normalised s; se_e3: the angular product)")
    p.add_argument("-e", "--extrapolate", type=float, default=5.0,
                   help="tables reach extrapolate x the data's upper bound")
    p.add_argument("-f", "--check-frequency", type=int, default=-1,
                   help="every N evaluations warn about edges in the extrapolated (coarse) table range; "
                        "edges beyond the tables are always an error")
    p.set_defaults(func=_compress)

    p = command("md", "molecular dynamics (NVE/NVT/NPT) with model deviation, from a YAML input")
    p.add_argument("input", help="input.yaml (keys: docs/md.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the input, e.g. --set steps=200 (repeatable; as dpmd train --set)")
    p.add_argument("--restart", default=None, help="continue from this checkpoint (output_dir/checkpoint.pt)")
    p.set_defaults(func=_md)

    p = command("build-ops", "compile the C++/CUDA kernel library (csrc/) and print its path")
    p.set_defaults(func=_build_ops)

    from dpmd import lammps as lammps_plugin

    p = command("build-lammps-plugin", "compile the LAMMPS pair_style dpmd plugin; prints its path")
    lammps_plugin.add_arguments(p)
    p.set_defaults(func=lammps_plugin.run)
    return parser


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def main(argv=None) -> int:
    from dpmd.runtime import configure_threads, keep_freed_memory, quiet_openmp

    quiet_openmp()   # before torch loads: OpenMP threads sleep instead of spinning when the user set no policy
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        dpmd_log.setup(args.log_level, args.log_path)
        dpmd_log.file_only(logger, logging.INFO, f"dpmd {shlex.join(argv)}  ({version()})")
        # train, md and demo size their threads by their input's work; a few commands do no tensor work
        if args.command not in ("train", "md", "demo", "convert", "doc-train-input", "build-ops",
                                "build-lammps-plugin"):
            configure_threads(args.threads)
        args.func(args)
    except BaseException as err:
        if os.environ.get("DPMD_DEBUG") or isinstance(err, SystemExit):
            raise
        if isinstance(err, BrokenPipeError):  # `dpmd doc-train-input | head`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
            return 0
        if isinstance(err, KeyboardInterrupt):
            message, rc = "interrupted", 130
        elif isinstance(err, (DpmdError, ValueError, OSError)):
            message, rc = f"error: {_one_line(err)}", 1
        else:  # a bug: still one line, the traceback on request
            message = f"internal error: {type(err).__name__}: {_one_line(err)} (set DPMD_DEBUG=1 for the traceback)"
            rc = 1
        if dpmd_log.process_rank() == 0:   # under mpiexec and torchrun every rank fails alike: one line
            print(f"dpmd {args.command}: {message}", file=sys.stderr)
        dpmd_log.file_only(logger, logging.ERROR, message)
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
