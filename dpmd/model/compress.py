"""Model compression (DeePMD-kit's `dp compress`): embedding nets -> piecewise quintic tables, for se_e2_a,
se_e2_r, se_e3, se_atten / se_atten_v2 (strip mode, attn_layer 0) and hybrids of them.

Each embedding net maps one scalar x to M features: the normalised first environment-matrix column
x = (s - mean)/std, s = sw(r)/r (se_e2_a, se_e2_r), or the product x = a_j . a_k of two neighbours' normalised
angular rows (se_e3).  It is replaced by one quintic polynomial per interval of a grid in x, matched to the
net in value, first and second derivative at both nodes of the interval (derivatives of the net by
forward-mode autograd, exact), so the table is C2 across nodes.

Range (one grid for every net of a descriptor, as in DeePMD-kit): s is 0 at rcut and largest at the smallest
neighbour distance of the training data (min_nbor_dist), so
    se_e2_a, se_e2_r:  lower = min over centre types of (0 - mean)/std,
                       upper = max over centre types of (s(min_nbor_dist) - mean)/std,
    se_e3:             |x| <= |a_j| |a_k| <= B = max over centre types of s(min_nbor_dist)^2 / min(std[1:4])^2
                       (DeePMD-kit's range too), so lower = -B, upper = B,
tabulated with `step`, then with 10 * step up to extrapolate * upper (se_e3: down to -extrapolate * B as
well).  An edge beyond that range is an error naming the atoms and the distance the table reaches (never a
silent extrapolation); with check_frequency N > 0 every N-th evaluation also warns about the coarse part.
The table itself (its evaluation and checks) is dpmd.model.descriptor.table.EmbeddingTable.

The layout (ranges, interval counts, the shortest covered distance per centre type) is recorded in
the model config as `compress` (a hybrid's: one layout per entry under `list`), the coefficients in each
descriptor's `table` buffer, so save_model / load_model / the frozen TorchScript module carry the
compressed model.
"""

from __future__ import annotations

import copy
import math

import torch

from dpmd.errors import ConfigError, DpmdError
from dpmd.model.descriptor.hybrid import DescriptorHybrid
from dpmd.model.descriptor.se_a import smooth_switch
from dpmd.model.descriptor.se_t import DescriptorSeT
from dpmd.model.descriptor.table import EmbeddingTable

COARSE_FACTOR = 10  # the extrapolated range uses 10x the step (DeePMD-kit)
MAX_TABLE_BYTES = 1 << 30  # the tables of all nets (DeePMD's default step 0.01 needs a few MB)
OPTIONS = ("min_nbor_dist", "step", "extrapolate", "check_frequency")
COMPRESS_KEYS = OPTIONS + ("lower", "upper", "end", "step_coarse", "n_fine", "n_coarse", "rmin")
# n_coarse_low: intervals below `lower` (se_e3); absent in files of se_e2_a models compressed before it existed
OPTIONAL_KEYS = ("n_coarse_low",)


def normalize_compress(section, ntypes: int, where: str = "model.compress") -> dict | None:
    """Validate the `model.compress` section (written by compress_model, not by users): a layout, or for a
    hybrid descriptor the options and one layout per entry under `list`."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {section!r}")
    if "list" in section:  # a hybrid's
        expected, optional = OPTIONS + ("list",), ()
    else:
        expected, optional = COMPRESS_KEYS, OPTIONAL_KEYS
    missing = [k for k in expected if k not in section]
    unknown = [k for k in section if k not in expected + optional]
    if missing or unknown:
        raise ConfigError(f"'{where}' needs exactly the keys {', '.join(expected)} "
                          f"(missing {missing}, unknown {unknown})")
    if "list" in section:
        if not isinstance(section["list"], list) or not section["list"]:
            raise ConfigError(f"'{where}.list' must be a non-empty list of table layouts")
        return {**section, "list": [normalize_compress(sub, ntypes, f"{where}.list[{i}]")
                                    for i, sub in enumerate(section["list"])]}
    section = {"n_coarse_low": 0, **section}
    for key in ("n_fine", "n_coarse", "n_coarse_low"):
        least = 0 if key == "n_coarse_low" else 1
        if isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < least:
            raise ConfigError(f"'{where}.{key}' must be an integer >= {least}, got {section[key]!r}")
    if not isinstance(section["rmin"], list) or len(section["rmin"]) != ntypes:
        raise ConfigError(f"'{where}.rmin' must list one distance per type, got {section['rmin']!r}")
    return section


def switched_s(r: float, rcut_smth: float, rcut: float) -> float:
    """s = sw(r)/r of the environment matrix, with the descriptors' own switch."""
    return float(smooth_switch(torch.tensor(float(r), dtype=torch.float64), rcut_smth, rcut)) / r


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


def _input_range(descriptor, s_max: float):
    """The table input's range over the data, (lower, upper), and per centre type the function that maps a
    table input reached by one edge back to that edge's s (from which distance_at gives the distance)."""
    if isinstance(descriptor, DescriptorSeT):  # x = a_j . a_k, |a|^2 <= s^2 / min(std[1:4])^2
        std_min = descriptor.std[:, 1:4].double().min(1)[0].tolist()
        bound = max((s_max / d) ** 2 for d in std_min)
        return -bound, bound, [lambda x, d=d: math.sqrt(x) * d for d in std_min]
    mean = descriptor.mean[:, 0].double().tolist()
    std = descriptor.std[:, 0].double().tolist()
    lower = min(-m / d for m, d in zip(mean, std))
    upper = max((s_max - m) / d for m, d in zip(mean, std))
    return lower, upper, [lambda x, m=m, d=d: x * d + m for m, d in zip(mean, std)]


def table_layout(descriptor, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0) -> dict:
    """Grid of one descriptor's tables: ranges of the table input, interval counts, and per centre type the
    shortest distance covered."""
    rs, rc = descriptor.rcut_smth, descriptor.rcut
    if not 0 < min_nbor_dist < rc:
        raise DpmdError(f"compress: min_nbor_dist must be > 0 Å and below the model's rcut {rc} Å, got {min_nbor_dist}")
    if not 0 < step < math.inf:
        raise DpmdError(f"compress: --step must be > 0, got {step}")
    if not 1 <= extrapolate < math.inf:
        raise DpmdError(f"compress: --extrapolate must be >= 1, got {extrapolate}")
    lower_data, upper_data, s_of = _input_range(descriptor, switched_s(min_nbor_dist, rs, rc))
    symmetric = isinstance(descriptor, DescriptorSeT)  # coarse intervals below the data's range too
    # the table size, checked before anything is allocated: intervals * nets * 6 coefficients * M (float64)
    coarse_span = max(0.0, (extrapolate - 1) * upper_data) * (2 if symmetric else 1)
    span = (upper_data - lower_data) + coarse_span / COARSE_FACTOR  # = intervals * step
    per_interval = len(descriptor.embeddings) * 6 * descriptor.width * 8
    if not span / step * per_interval <= MAX_TABLE_BYTES:
        min_step = span * per_interval / MAX_TABLE_BYTES
        fix = f"--step >= {_round_up(min_step)}" if min_step < math.inf else "a smaller --extrapolate"
        raise DpmdError(f"compress: --step {step:g} (with --extrapolate {extrapolate:g}) needs {span / step:.3g} table "
                        f"intervals, {span / step * per_interval / 2**30:.3g} GiB of tables; the limit is "
                        f"{MAX_TABLE_BYTES / 2**30:g} GiB: use {fix}")
    n_fine = max(1, math.ceil((upper_data - lower_data) / step - 1e-9))
    lower = -0.5 * n_fine * step if symmetric else lower_data
    upper = lower + n_fine * step
    step_coarse = COARSE_FACTOR * step
    n_coarse = max(1, math.ceil((extrapolate * upper_data - upper) / step_coarse - 1e-9))
    end = upper + n_coarse * step_coarse
    rmin = [distance_at(s(end), rs, rc) for s in s_of]
    return {"min_nbor_dist": float(min_nbor_dist), "step": float(step), "extrapolate": float(extrapolate),
            "lower": lower, "upper": upper, "end": end, "step_coarse": step_coarse,
            "n_fine": n_fine, "n_coarse": n_coarse, "n_coarse_low": n_coarse if symmetric else 0, "rmin": rmin}


def table_nodes(layout: dict) -> torch.Tensor:
    """Nodes (intervals + 1,) in float64, exactly as EmbeddingTable locates intervals."""
    low = layout.get("n_coarse_low", 0)
    k_low = torch.arange(low, dtype=torch.float64)
    k_fine = torch.arange(layout["n_fine"] + 1, dtype=torch.float64)
    k_coarse = torch.arange(1, layout["n_coarse"] + 1, dtype=torch.float64)
    start = layout["lower"] - low * layout["step_coarse"]
    return torch.cat([start + k_low * layout["step_coarse"], layout["lower"] + k_fine * layout["step"],
                      layout["upper"] + k_coarse * layout["step_coarse"]])


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


def tabulated_parts(model) -> list:
    """(name, descriptor) of each descriptor to tabulate: the model's, or each entry of a hybrid; one line
    naming the part that cannot be compressed."""
    d, cfg = model.descriptor, model.config["descriptor"]
    parts = ([(f"descriptor.list[{i}]", sub, c) for i, (sub, c) in enumerate(zip(d.descriptors, cfg["list"]))]
             if isinstance(d, DescriptorHybrid) else [("descriptor", d, cfg)])
    for name, sub, c in parts:
        if not isinstance(sub, EmbeddingTable):
            raise DpmdError(f"compress: {name} ({c['type']}) cannot be compressed: it has no tabulated form")
    return [(name, sub) for name, sub, _ in parts]


def check_compressible(model) -> None:
    """Tables of a model with non-finite weights, or broken or missing statistics, would be garbage (or a
    division by zero): one line saying which."""
    from dpmd.model.export import first_nonfinite

    parts = tabulated_parts(model)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise DpmdError(f"compress: the model's {bad} holds NaN or inf values")
    for name, d in parts:
        zero = (d.std <= 0).nonzero()
        if zero.numel():
            t, col = zero[0].tolist()
            raise DpmdError(f"compress: the {name} std of type {model.type_map[t]} (column {col}) is "
                            f"{float(d.std[t, col]):g}; the environment matrix is divided by it: the model's "
                            f"statistics are broken")
        if bool((d.mean == 0).all()) and bool((d.std == 1).all()):
            raise DpmdError(f"compress: the model has no data statistics ({name} mean 0 and std 1, as "
                            f"initialised): compress a model trained on data")


def compress_model(model, min_nbor_dist: float, step: float = 0.01, extrapolate: float = 5.0,
                   check_frequency: int = -1):
    """A compressed copy of a DeepPot (the input model is left as it is)."""
    if model.descriptor.compressed:
        raise DpmdError("compress: the model is already compressed")
    check_compressible(model)
    options = {"min_nbor_dist": float(min_nbor_dist), "step": float(step), "extrapolate": float(extrapolate),
               "check_frequency": int(check_frequency)}
    layouts = [{**table_layout(d, min_nbor_dist, step, extrapolate), **options} for _, d in tabulated_parts(model)]
    spec = {**options, "list": layouts} if isinstance(model.descriptor, DescriptorHybrid) else layouts[0]
    out = copy.deepcopy(model)
    out.config["compress"] = spec
    out.descriptor.enable_compression(spec, spec["check_frequency"])
    for (_, d), (_, copied), layout in zip(tabulated_parts(model), tabulated_parts(out), layouts):
        copied.table.copy_(build_tables(d, layout).to(copied.table.device))
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
