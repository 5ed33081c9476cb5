"""Model compression (DeePMD-kit's `dp compress` for se_e2_a): embedding nets -> piecewise quintic tables.

Each embedding net maps the normalised first environment-matrix column x = (s - mean)/std, s = sw(r)/r,
to M features.  It is replaced by one quintic polynomial per interval of a grid in x, matched to the
net in value, first and second derivative at both nodes of the interval (derivatives of the net by
forward-mode autograd, exact), so the table is C2 across nodes.

Range (one grid for every net, as in DeePMD-kit): s is 0 at rcut and largest at the smallest
neighbour distance of the training data (min_nbor_dist), so
    lower = min over centre types of (0 - mean)/std,  upper = max over centre types of (s(min_nbor_dist) - mean)/std,
tabulated with `step`, then (upper, extrapolate * upper] with 10 * step.  An edge beyond that range is
an error naming the atoms and the distance the table reaches (never a silent extrapolation); with
check_frequency N > 0 every N-th evaluation also warns about edges in the coarse part.

The layout (ranges, interval counts, the shortest covered distance per centre type) is recorded in
the model config as `compress`, the coefficients in the descriptor's `table` buffer, so save_model /
load_model / the frozen TorchScript module carry the compressed model.
"""

from __future__ import annotations

import copy
import math

import torch

from dpmd.errors import ConfigError, DpmdError

COARSE_FACTOR = 10  # the extrapolated range uses 10x the step (DeePMD-kit)
MAX_TABLE_BYTES = 1 << 30  # the tables of all nets (DeePMD's default step 0.01 needs a few MB)
COMPRESS_KEYS = ("min_nbor_dist", "step", "extrapolate", "check_frequency", "lower", "upper", "end",
                 "step_coarse", "n_fine", "n_coarse", "rmin")


def normalize_compress(section, ntypes: int) -> dict | None:
    """Validate the `model.compress` section (written by compress_model, not by users)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"'model.compress' must be a mapping, got {section!r}")
    missing = [k for k in COMPRESS_KEYS if k not in section]
    unknown = [k for k in section if k not in COMPRESS_KEYS]
    if missing or unknown:
        raise ConfigError(f"'model.compress' needs exactly the keys {', '.join(COMPRESS_KEYS)} "
                          f"(missing {missing}, unknown {unknown})")
    for key in ("n_fine", "n_coarse"):
        if isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < 1:
            raise ConfigError(f"'model.compress.{key}' must be a positive integer, got {section[key]!r}")
    if not isinstance(section["rmin"], list) or len(section["rmin"]) != ntypes:
        raise ConfigError(f"'model.compress.rmin' must list one distance per type, got {section['rmin']!r}")
    return dict(section)


def switched_s(r: float, rcut_smth: float, rcut: float) -> float:
    """s = sw(r)/r of the environment matrix (dpmd.model.descriptor.smooth_switch)."""
    u = min(max((r - rcut_smth) / (rcut - rcut_smth), 0.0), 1.0)
    return (u ** 3 * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0) / r


def distance_at(s_target: float, rcut_smth: float, rcut: float) -> float:
    """The distance r with sw(r)/r = s_target (s decreases monotonically with r)."""
    if s_target >= 1.0 / rcut_smth:
        return 1.0 / s_target
    lo, hi = rcut_smth, rcut
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if switched_s(mid, rcut_smth, rcut) > s_target else (lo, mid)
    return 0.5 * (lo + hi)


def _round_up(x: float) -> str:
    """x > 0 rounded up to two significant digits (a bound that, printed, still holds)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return f"{math.ceil(x / unit) * unit:.2g}"


def table_layout(descriptor, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0) -> dict:
    """Grid of the tables: ranges in normalised s, interval counts, and per centre type the shortest
    distance covered."""
    rs, rc = descriptor.rcut_smth, descriptor.rcut
    if not 0 < min_nbor_dist < rc:
        raise DpmdError(f"compress: min_nbor_dist must be > 0 Å and below the model's rcut {rc} Å, got {min_nbor_dist}")
    if not 0 < step < math.inf:
        raise DpmdError(f"compress: --step must be > 0, got {step}")
    if not 1 <= extrapolate < math.inf:
        raise DpmdError(f"compress: --extrapolate must be >= 1, got {extrapolate}")
    mean = descriptor.mean[:, 0].double().tolist()
    std = descriptor.std[:, 0].double().tolist()
    s_max = switched_s(min_nbor_dist, rs, rc)
    lower = min(-m / d for m, d in zip(mean, std))
    upper_data = max((s_max - m) / d for m, d in zip(mean, std))
    # the table size, checked before anything is allocated: intervals * nets * 6 coefficients * M (float64)
    span = (upper_data - lower) + max(0.0, (extrapolate - 1) * upper_data) / COARSE_FACTOR  # = intervals * step
    per_interval = len(descriptor.embeddings) * 6 * descriptor.width * 8
    if not span / step * per_interval <= MAX_TABLE_BYTES:
        min_step = span * per_interval / MAX_TABLE_BYTES
        fix = f"--step >= {_round_up(min_step)}" if min_step < math.inf else "a smaller --extrapolate"
        raise DpmdError(f"compress: --step {step:g} (with --extrapolate {extrapolate:g}) needs {span / step:.3g} table "
                        f"intervals, {span / step * per_interval / 2**30:.3g} GiB of tables; the limit is "
                        f"{MAX_TABLE_BYTES / 2**30:g} GiB: use {fix}")
    n_fine = max(1, math.ceil((upper_data - lower) / step - 1e-9))
    upper = lower + n_fine * step
    step_coarse = COARSE_FACTOR * step
    n_coarse = max(1, math.ceil((extrapolate * upper_data - upper) / step_coarse - 1e-9))
    end = upper + n_coarse * step_coarse
    rmin = [distance_at(end * d + m, rs, rc) for m, d in zip(mean, std)]
    return {"min_nbor_dist": float(min_nbor_dist), "step": float(step), "extrapolate": float(extrapolate),
            "lower": lower, "upper": upper, "end": end, "step_coarse": step_coarse,
            "n_fine": n_fine, "n_coarse": n_coarse, "rmin": rmin}


def table_nodes(layout: dict) -> torch.Tensor:
    """Nodes (n_fine + n_coarse + 1,) in float64, exactly as the descriptor locates intervals."""
    k_fine = torch.arange(layout["n_fine"] + 1, dtype=torch.float64)
    k_coarse = torch.arange(1, layout["n_coarse"] + 1, dtype=torch.float64)
    return torch.cat([layout["lower"] + k_fine * layout["step"], layout["upper"] + k_coarse * layout["step_coarse"]])


def net_derivatives(net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, first and second derivative (each (n, M)) of a scalar-input net at x (n,), by forward-mode
    autograd (each input row is independent, so a tangent of ones gives every row's derivative)."""
    from torch.func import jvp

    x = x.reshape(-1, 1)
    ones = torch.ones_like(x)

    def first(y):
        return jvp(net, (y,), (ones,))

    with torch.no_grad():
        (value, d1), (_, d2) = jvp(first, (x,), (ones,))
    return value, d1, d2


def quintic_coefficients(nodes: torch.Tensor, value, d1, d2) -> torch.Tensor:
    """Coefficients (intervals, 6, M) of p(t) = sum_k c_k t^k, t = x - node, matching value, first and
    second derivative at both nodes of each interval."""
    h = (nodes[1:] - nodes[:-1]).unsqueeze(1)
    y0, y1, a0, a1, b0, b1 = value[:-1], value[1:], d1[:-1], d1[1:], d2[:-1], d2[1:]
    dy = y1 - y0
    c3 = (20 * dy - (8 * a1 + 12 * a0) * h - (3 * b0 - b1) * h ** 2) / (2 * h ** 3)
    c4 = (-30 * dy + (14 * a1 + 16 * a0) * h + (3 * b0 - 2 * b1) * h ** 2) / (2 * h ** 4)
    c5 = (12 * dy - 6 * (a1 + a0) * h - (b0 - b1) * h ** 2) / (2 * h ** 5)
    return torch.stack([y0, a0, 0.5 * b0, c3, c4, c5], dim=1)


def build_tables(descriptor, layout: dict) -> torch.Tensor:
    """Coefficients (nets, intervals, 6, M) of every embedding net, computed in float64."""
    nodes = table_nodes(layout)
    tables = []
    for net in descriptor.embeddings:
        net64 = copy.deepcopy(net).to(torch.float64).cpu()
        tables.append(quintic_coefficients(nodes, *net_derivatives(net64, nodes)))
    return torch.stack(tables)


def check_compressible(model) -> None:
    """Tables of a model with non-finite weights, or broken or missing statistics, would be garbage (or a
    division by zero): one line saying which."""
    from dpmd.model.export import first_nonfinite

    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise DpmdError(f"compress: the model's {bad} holds NaN or inf values")
    d = model.descriptor
    zero = (d.std <= 0).nonzero()
    if zero.numel():
        t, col = zero[0].tolist()
        raise DpmdError(f"compress: the descriptor std of type {model.type_map[t]} (column {col}) is "
                        f"{float(d.std[t, col]):g}; the environment matrix is divided by it: the model's statistics "
                        f"are broken")
    if bool((d.mean == 0).all()) and bool((d.std == 1).all()):
        raise DpmdError("compress: the model has no data statistics (descriptor mean 0 and std 1, as initialised): "
                        "compress a model trained on data")


def compress_model(model, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0,
                   check_frequency: int = -1):
    """A compressed copy of a DeepPot (the input model is left as it is)."""
    if not hasattr(model.descriptor, "enable_compression"):
        raise DpmdError(f"compress: a {model.config['descriptor']['type']} descriptor cannot be compressed yet "
                        f"(se_e2_a can)")
    if model.descriptor.compressed:
        raise DpmdError("compress: the model is already compressed")
    check_compressible(model)
    layout = table_layout(model.descriptor, min_nbor_dist, step, extrapolate)
    spec = {**layout, "check_frequency": int(check_frequency)}
    out = copy.deepcopy(model)
    out.config["compress"] = spec
    out.descriptor.enable_compression(spec, spec["check_frequency"])
    table = build_tables(model.descriptor, layout)
    out.descriptor.table.copy_(table.to(out.descriptor.table.device))
    return out


def min_nbor_dist_of_systems(paths, model, where: str = "the training data") -> float:
    """Smallest neighbour distance in some data systems (like `dp compress -t`: the training systems)."""
    from dpmd.data import load_systems
    from dpmd.geometry.neighbor import neighbor_stat

    systems = load_systems(paths, type_map=model.type_map)
    frames = ((s.coord[f], s.atype, None if s.box is None else s.box[f]) for s in systems for f in range(s.nframes))
    _, dmin = neighbor_stat(frames, model.rcut, model.ntypes)
    if not math.isfinite(dmin):
        raise DpmdError(f"{where}: no pair of atoms within rcut = {model.rcut} Å")
    return dmin


def check_graph(model, graph: dict) -> None:
    """Every edge of a graph inside the compressed model's tables, else a one-line error naming the atoms."""
    from dpmd.geometry.graph import edge_vectors

    d = model.descriptor
    center, neighbor, atype = graph["center"], graph["neighbor"], graph["atype"]
    if center.numel() == 0:
        return
    vec = edge_vectors(graph, slice(0, center.numel())).detach()
    ct = atype[center]
    k = d.edge_outside_table(vec, ct)
    if k >= 0:
        n = graph["natoms"]
        i, j = int(center[k]), int(neighbor[k])
        frame = f" of frame {i // n}" if atype.numel() > n else ""
        where = f"atom {i % n}{frame} ({model.type_map[int(ct[k])]}) and its neighbour {j % n} " \
                f"({model.type_map[int(atype[j])]})"
        raise DpmdError(d.table_message(where, float(vec[k].norm()), int(ct[k])))


def compress_file(input_path, output_path, *, step: float = 0.01, extrapolate: float = 5.0,
                  check_frequency: int = -1, training_systems=None, min_nbor_dist: float | None = None,
                  systems_source: str = "the training data") -> dict:
    """`dpmd compress`: read a model, tabulate it, write the frozen compressed model atomically.  The table
    range comes from min_nbor_dist, or from the data systems `training_systems` (the caller reads them from
    its training input, `systems_source`, named in errors: the model layer does not read training inputs)."""
    from dpmd.model.io import load_model, save_model

    model = load_model(input_path)
    if min_nbor_dist is None:
        if training_systems is None:
            raise DpmdError("compress: the table range needs the smallest neighbour distance of the training data: "
                            "give -t input.yaml (its training systems are scanned) or --min-nbor-dist")
        min_nbor_dist = min_nbor_dist_of_systems(training_systems, model,
                                                 f"{systems_source}: its training data")
    compressed = compress_model(model, min_nbor_dist, step, extrapolate, check_frequency)
    save_model(compressed, output_path)
    return compressed.config["compress"]
