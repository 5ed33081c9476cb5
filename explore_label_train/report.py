"""`elt status` (a table) and `elt report` (an HTML page with PNG figures), read from the campaign database.

The report judges the final potential on the held-out labels (select.holdout, test_data/): labels that no
model of the campaign trained on.  It shows the final ensemble's energy and force errors there (the mean of
the members' predictions, and each member), overall and per exploration condition (structure, temperature,
pressure), the same errors of every earlier iteration's ensemble against the labels it trained on, the
members' learning curves, and the exploration: deviation classes, deviation histograms, the frames selected
per condition and the MD runs that stopped early (incidents) with dpmd's message.  Links are relative, so
the page works when opened from disk, and point at the final models and the data.
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import os
import platform
import re
import time
import urllib.parse
from pathlib import Path

import numpy as np

from explore_label_train.campaign import STAGES, Campaign
from explore_label_train.state import State

CLASS_COLOURS = {"accurate": "#2ca02c", "candidate": "#ff7f0e", "failed": "#d62728"}


def _pct(x):
    return "-" if x is None else f"{100 * x:5.1f}%"


def status_rows(state: State) -> list[dict]:
    rows = []
    its = state.q("SELECT * FROM iterations ORDER BY iteration")
    for r in its:
        it = r["iteration"]
        done = {s["stage"] for s in state.q("SELECT stage FROM stages WHERE iteration=? AND status='done'", it)}
        stage = "done" if r["status"] == "done" else next((s for s in STAGES if s not in done), "check")
        t = {k: state.one("SELECT COUNT(*) FROM tasks WHERE iteration=? AND status=?", it, k)
             for k in ("done", "failed", "pending")}
        if r["status"] == "done":
            acc, cand, fail = r["accurate"], r["candidate"], r["failed"]
        else:
            n = state.one("SELECT COUNT(*) FROM frames WHERE iteration=?", it)
            c = {k: state.one("SELECT COUNT(*) FROM frames WHERE iteration=? AND class=?", it, k)
                 for k in ("accurate", "candidate", "failed")}
            acc, cand, fail = ((c["accurate"] / n, c["candidate"] / n, c["failed"] / n) if n else (None, None, None))
        labels = state.one("SELECT COUNT(*) FROM labels WHERE iteration=?", it)
        total = state.one("SELECT COUNT(*) FROM labels WHERE iteration<=?", it)
        rows.append({"iteration": it, "stage": stage, "done": t["done"], "failed": t["failed"],
                     "pending": t["pending"], "labels": labels, "total_labels": total, "accurate": acc,
                     "candidate": cand, "failed_frac": fail, "val_rmse_f": r["val_rmse_f"],
                     "decision": r["decision"] or ""})
    return rows


def status_table(state: State) -> str:
    head = (f"{'iter':>4}  {'stage':<8} {'tasks done/failed/pending':>25}  {'labels (total)':>14}  "
            f"{'accurate':>8} {'candidate':>9} {'failed':>7}  {'val rmse_f':>10}  decision")
    lines = [head, "-" * len(head)]
    for r in status_rows(state):
        tasks = f"{r['done']}/{r['failed']}/{r['pending']}"
        rm = "-" if r["val_rmse_f"] is None else f"{r['val_rmse_f']:.3g}"
        lines.append(f"{r['iteration']:>4}  {r['stage']:<8} {tasks:>25}  {str(r['labels']) + ' (' + str(r['total_labels']) + ')':>14}  "
                     f"{_pct(r['accurate']):>8} {_pct(r['candidate']):>9} {_pct(r['failed_frac']):>7}  {rm:>10}  {r['decision']}")
    if len(lines) == 2:
        lines.append("(no iteration started yet)")
    failed = state.q("SELECT task_id, reason FROM tasks WHERE status='failed' ORDER BY task_id LIMIT 10")
    if failed:
        lines.append("failed tasks:")
        lines += [f"  {r['task_id']}: {r['reason']}" for r in failed]
    stages: dict = {}
    for j in state.jobs_in_flight():
        stages.setdefault((j["iteration"], j["kind"]), []).append(f"{j['job_id'] or j['job_hash'][:10]} {j['state']}")
    if stages:
        lines.append("cluster jobs not finished (as last seen; a resumed run re-attaches to them):")
        lines += [f"  iteration {it} {kind}: {', '.join(jobs)}" for (it, kind), jobs in stages.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- data
def _versions() -> str:
    parts = []
    for name in ("dpmd", "torch", "ase"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts + [f"Python {platform.python_version()}"])


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{seconds:.1f} s"


def _date(t) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(t))


class Conditions:
    """Names of exploration conditions: structure, temperature and (NPT stages only) pressure."""

    def __init__(self, cfg: dict):
        self.npt = {s["name"]: s["ensemble"] == "npt" for s in cfg.get("explore", [])}

    def key(self, structure, temperature, pressure, stage) -> tuple:
        return (structure or "?", temperature, pressure if self.npt.get(stage) else None)

    @staticmethod
    def name(key: tuple) -> str:
        structure, t, p = key
        if t is None:
            return f"{structure}, initial (perturbed)"
        return f"{structure}, {t:g} K" + ("" if p is None else f", {p:g} bar")

    @staticmethod
    def order(key: tuple):
        return (key[0], -1 if key[1] is None else key[1], -np.inf if key[2] is None else key[2])


def final_iteration(state: State, members: int):
    """The last iteration whose whole ensemble is trained, or None."""
    return state.one("SELECT iteration FROM tasks WHERE kind='train' AND status='done' GROUP BY iteration "
                     "HAVING COUNT(*) = ? ORDER BY iteration DESC LIMIT 1", members)


def held_out_frames(state: State, camp: Campaign, conditions: Conditions) -> list[dict]:
    """The held-out labels, each checked against the sha256 its task recorded, with its condition."""
    if not state.has_table("holdout"):
        return []
    rows = state.q("SELECT l.task_id, l.file, l.system, l.natoms, l.iteration, l.source, f.structure, "
                   "f.temperature, f.pressure, f.stage FROM holdout h JOIN labels l USING (label_id) "
                   "LEFT JOIN frames f USING (frame_id) ORDER BY l.label_id")
    frames = []
    for r in rows:
        with np.load(camp.recorded(r["task_id"], r["file"])) as z:
            if r["structure"] is None:   # an initial structure's perturbed copy
                key = (r["source"].removeprefix("initial:"), None, None)
            else:
                key = conditions.key(r["structure"], r["temperature"], r["pressure"], r["stage"])
            frames.append({"system": r["system"], "natoms": r["natoms"], "iteration": r["iteration"],
                           "condition": key, "symbols": [str(s) for s in z["symbols"]], "coord": z["coord"],
                           "box": z["box"] if "box" in z.files else None, "energy": float(z["energy"]),
                           "force": z["force"]})
    return frames


def predict(models, frames: list[dict], chunk: int = 32) -> dict:
    """Each model on each frame: energy per atom (K, F) in eV/atom and forces [(K, N, 3)] in eV/Å."""
    import torch

    energy = np.zeros((len(models), len(frames)))
    forces = [np.zeros((len(models), f["natoms"], 3)) for f in frames]
    groups: dict = {}
    for i, f in enumerate(frames):   # frames of one system (same atoms in the same order) are evaluated together
        groups.setdefault((f["system"], f["box"] is not None), []).append(i)
    for k, model in enumerate(models):
        for (_, periodic), idx in groups.items():
            types = torch.tensor([model.type_map.index(s) for s in frames[idx[0]]["symbols"]])
            for a in range(0, len(idx), chunk):
                part = idx[a:a + chunk]
                box = torch.as_tensor(np.stack([frames[i]["box"] for i in part])) if periodic else None
                out = model(torch.as_tensor(np.stack([frames[i]["coord"] for i in part])), types, box)
                e = out["energy"].detach().cpu().numpy().reshape(len(part))
                f = out["force"].detach().cpu().numpy().reshape(len(part), -1, 3)
                for j, i in enumerate(part):
                    energy[k, i] = e[j] / frames[i]["natoms"]
                    forces[i][k] = f[j]
    return {"energy": energy, "force": forces}


def errors(frames: list[dict], pred: dict, idx=None, member=None) -> tuple[float, float]:
    """(energy RMSE in meV/atom, force RMSE in eV/Å per component) over the frames idx (default all), of one
    member or (None) the ensemble mean: the mean of the members' energies and forces."""
    idx = range(len(frames)) if idx is None else idx
    de, df = [], []
    for i in idx:
        e = pred["energy"][:, i].mean() if member is None else pred["energy"][member, i]
        f = pred["force"][i].mean(0) if member is None else pred["force"][i][member]
        de.append(e - frames[i]["energy"] / frames[i]["natoms"])
        df.append((f - frames[i]["force"]).ravel())
    if not de:
        return float("nan"), float("nan")
    return 1000 * float(np.sqrt(np.mean(np.square(de)))), float(np.sqrt(np.mean(np.square(np.concatenate(df)))))


def load_ensemble(camp: Campaign, it: int) -> list:
    from dpmd.model import load_model

    paths = [camp.recorded(f"i{it:03d}-train-m{k}", camp.model_path(it, k).relative_to(camp.root))
             for k in range(camp.cfg["train"]["ensemble_size"])]
    return [load_model(p).eval() for p in paths]


def read_lcurve(path: Path) -> dict | None:
    """{column: values} of a dpmd/DeePMD lcurve.out (its '#' header names the columns), or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    header = next((ln[1:].split() for ln in lines if ln.startswith("#")), None)
    rows = [ln.split() for ln in lines if ln.strip() and not ln.startswith("#")]
    if not header or not rows:
        return None
    try:
        table = np.array([[float(x) for x in r[:len(header)]] for r in rows if len(r) >= len(header)])
    except ValueError:
        return None
    return {name: table[:, j] for j, name in enumerate(header)} if len(table) else None


# ---------------------------------------------------------------------------------------------------- report
class _Page:
    """The HTML page and its figures, written into out_dir."""

    def __init__(self, out_dir: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out = out_dir
        self.parts: list[str] = []

    def add(self, *text: str) -> None:
        self.parts.extend(text)

    def figure(self, fig, name: str, caption: str) -> None:
        fig.savefig(self.out / name, dpi=100, bbox_inches="tight")
        self.plt.close(fig)
        self.add(f"<figure><img src='{name}' alt='{html.escape(caption)}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def link(self, target: Path, text: str | None = None) -> str:
        """A link relative to the page, so that it works when the page is opened from disk."""
        rel = Path(os.path.relpath(target, self.out)).as_posix() + ("/" if target.is_dir() else "")
        return f"<a href='{urllib.parse.quote(rel)}'>{html.escape(text or rel)}</a>"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (escape what needs it)."""
    return (f"<table class='{cls}'>" + ("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else "")
            + "".join("<tr>" + "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
                      + "</tr>" for row in rows) + "</table>")


def _num(x, cell_id: str | None = None, fmt: str = ".3g") -> str:
    """A right-aligned number cell (with an id where tests and scripts read the value)."""
    ident = f" id='{cell_id}'" if cell_id else ""
    return f"<td class='n'{ident}>{'-' if x is None or not np.isfinite(x) else format(x, fmt)}</td>"


CSS = """body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1150px;margin:0 auto;padding:1em 2em;
color:#222;line-height:1.45} h1{margin:.3em 0 .1em}
h2{border-bottom:1px solid #ccc;padding-bottom:.15em;margin-top:1.8em}
.sub{color:#555;margin-top:0} table{border-collapse:collapse;margin:.6em 0} th,td{padding:3px 10px;
border-bottom:1px solid #e4e4e4;vertical-align:top} th{background:#f3f3f3;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} table.facts th{background:none;width:11em}
figure{margin:1em 0} figure img{max-width:100%} figcaption{color:#555;font-size:.9em;max-width:60em}
.note{color:#555;max-width:60em} code{background:#f4f4f4;padding:1px 4px} pre{font-size:.85em;overflow-x:auto}
td.msg{font-family:monospace;font-size:.85em;max-width:55em}"""


def write_report(state: State, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = _Page(out_dir)
    root = state.path.parent
    cfg = state.get_meta("config", {})
    conditions = Conditions(cfg)
    rows = status_rows(state)
    # the campaign of this database, for its checked file access (nothing is written to the database)
    camp = None
    if cfg:
        camp = Campaign(dict(cfg, work_dir=str(root)), log=None)
        camp._state = state
    members = cfg.get("train", {}).get("ensemble_size", 0)
    final = final_iteration(state, members) if camp else None
    frames = held_out_frames(state, camp, conditions) if camp else []

    _header(page, state, cfg, rows, root, final, members, frames)
    pred = None
    if final is not None and frames:
        pred = predict(load_ensemble(camp, final), frames)
    _final_errors(page, cfg, frames, pred, final, members)
    _history(page, state, camp, frames, pred, final)
    _learning_curves(page, camp, final, members)
    _exploration(page, state, cfg, rows, conditions)
    _times(page, state, rows)
    page.add("<h2>Status</h2><pre>" + html.escape(status_table(state)) + "</pre>")
    path = out_dir / "report.html"
    path.write_text("<!doctype html><html><head><meta charset='utf-8'>"
                    f"<title>{html.escape(_name(cfg, root))}: campaign report</title><style>{CSS}</style></head>"
                    "<body>\n" + "\n".join(page.parts) + "\n</body></html>\n")
    return path


def _name(cfg: dict, root: Path) -> str:
    return Path(cfg["source"]).stem if cfg.get("source") else root.name


def _header(page, state, cfg, rows, root, final, members, frames) -> None:
    stages = state.q("SELECT status, started, finished, seconds FROM stages")
    busy = sum(r["seconds"] or 0.0 for r in stages)
    started = state.get_meta("created") or min((r["started"] for r in stages if r["started"]), default=None)
    last = max((r["finished"] for r in stages if r["finished"]), default=None)
    running = sum(r["status"] == "running" for r in stages)
    decision = rows[-1]["decision"] if rows else ""
    n_labels = state.one("SELECT COUNT(*) FROM labels")
    page.add(f"<h1>{html.escape(_name(cfg, root))}: active-learning campaign</h1>",
             f"<p class='sub'>{len(rows)} iteration{'s' * (len(rows) != 1)}, "
             f"{html.escape(decision or 'running')}; report written {_date(time.time())}</p>")
    span = f"; {_duration(last - started)} from start to the last stage" if started and last else ""
    facts = [("campaign file", html.escape(cfg.get("source", "-"))), ("work directory", html.escape(str(root))),
             ("started", _date(started)), ("last stage finished", _date(last)),
             ("compute time", f"{_duration(busy)} (the sum of the stages' times"
                              + (f"; {running} stage still running, not counted" if running else "") + span + ")"),
             ("labels", f"{n_labels} ({len(frames)} held out for testing, in test_data/)")]
    lab = cfg.get("labeller")
    if lab and "code" in lab:   # a DFT code: its command and input template
        template = next((Path(lab[k]).name for k in ("fp_incar", "external_input_path") if lab.get(k)), None)
        facts.append(("reference labels", html.escape(f"{lab['code']} (`{lab['command']}`"
                                                      + (f", {template}" if template else "") + ")")))
    elif lab:
        kwargs = ", ".join(f"{k}={v}" for k, v in lab["kwargs"].items())
        facts.append(("reference labels", html.escape(lab["calculator"] + (f" ({kwargs})" if kwargs else ""))))
    if cfg.get("trust"):
        facts.append(("trust levels", f"lo {cfg['trust']['lo']:g}, hi {cfg['trust']['hi']:g} eV/Å "
                                      "(ensemble's max force deviation)"))
    facts.append(("versions", html.escape(_versions()) + " (this report's environment)"))
    if final is not None:
        models = [page.link(root / f"iter.{final:03d}" / "train" / f"m{k}" / "model.pth", f"m{k}")
                  for k in range(members)]
        facts.append(("final models", f"iteration {final}: " + ", ".join(models)
                      + f" (in {page.link(root / f'iter.{final:03d}' / 'train')})"))
    for folder, what in (("data", "training data"), ("test_data", "held-out test data")):
        systems = sorted(p for p in (root / folder).glob("*") if p.is_dir())
        if systems:
            facts.append((what, page.link(root / folder) + ": " + ", ".join(page.link(p, p.name) for p in systems)))
    if (root / "campaign.db").is_file():
        facts.append(("database", page.link(root / "campaign.db")))
    page.add(_table([], [[f"<th>{k}</th>", v] for k, v in facts], "facts"))
    if final is not None and frames:
        page.add(f"<p class='note'>Test a model on the held-out data yourself, from the work directory: "
                 f"<code>dpmd test -m iter.{final:03d}/train/m0/model.pth -s test_data</code></p>")


def _final_errors(page, cfg, frames, pred, final, members) -> None:
    page.add("<h2>Final ensemble on the held-out labels</h2>")
    if final is None:
        page.add("<p class='note'>No ensemble has finished training yet.</p>")
        return
    if not frames:
        frac = cfg.get("select", {}).get("holdout", 0)
        page.add(f"<p class='note'>No held-out labels: select.holdout is {frac:g}, and a labelling stage holds out "
                 f"labels only once it adds 5 or more. Without them the campaign has no error on labels its "
                 f"models never trained on.</p>")
        return
    plt = page.plt
    page.add(f"<p class='note'>{len(frames)} labels of iterations "
             f"{', '.join(str(i) for i in sorted({f['iteration'] for f in frames}))} were kept out of every "
             f"model's training data (select.holdout {cfg['select']['holdout']:g} of each labelling stage's new "
             f"labels, drawn at random). The ensemble's prediction is the mean of its {members} members; energies "
             f"per atom, forces per Cartesian component. The held-out frames were chosen by the campaign's "
             f"selection (uncertain frames), so they are harder than typical MD frames; init's are perturbed "
             f"copies of the initial structures.</p>")
    table = [["ensemble mean", *_err_cells(frames, pred, None, "ensemble")]]
    table += [[f"member m{k}", *_err_cells(frames, pred, k, f"m{k}")] for k in range(members)]
    page.add(_table([f"model (iteration {final})", "energy RMSE (meV/atom)", "force RMSE (eV/Å)"], table))
    # per condition
    keys = sorted({f["condition"] for f in frames}, key=Conditions.order)
    by_key = {k: [i for i, f in enumerate(frames) if f["condition"] == k] for k in keys}
    rows = []
    for n, k in enumerate(keys):
        e, f = errors(frames, pred, by_key[k])
        member_f = [errors(frames, pred, by_key[k], m)[1] for m in range(members)]
        rows.append([html.escape(Conditions.name(k)), _num(len(by_key[k]), fmt="d"), _num(e, f"cond{n}-e"),
                     _num(f, f"cond{n}-f"), f"<td class='n'>{min(member_f):.3g} – {max(member_f):.3g}</td>"])
    page.add("<h3>Per exploration condition</h3>",
             _table(["condition (structure, temperature, pressure)", "held-out labels",
                     "energy RMSE (meV/atom)", "force RMSE (eV/Å)", "force RMSE of the members (eV/Å)"], rows))
    # parity plots, one colour per condition
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    colours = plt.get_cmap("tab10")
    mean_e = {}
    for f in frames:   # energies relative to the mean reference of their composition: one scale for all
        mean_e.setdefault(f["system"], []).append(f["energy"] / f["natoms"])
    mean_e = {s: float(np.mean(v)) for s, v in mean_e.items()}
    for n, k in enumerate(keys):
        idx = by_key[k]
        ref = np.array([1000 * (frames[i]["energy"] / frames[i]["natoms"] - mean_e[frames[i]["system"]]) for i in idx])
        model = np.array([1000 * (pred["energy"][:, i].mean() - mean_e[frames[i]["system"]]) for i in idx])
        spread = np.array([1000 * pred["energy"][:, i].std() for i in idx])
        c = colours(n % 10)
        axes[0].errorbar(ref, model, yerr=spread, fmt="o", ms=4, color=c, ecolor=c, elinewidth=0.8, alpha=0.85,
                         label=Conditions.name(k))
        fr = np.concatenate([frames[i]["force"].ravel() for i in idx])
        fm = np.concatenate([pred["force"][i].mean(0).ravel() for i in idx])
        axes[1].plot(fr, fm, ".", ms=3, color=c, alpha=0.6)
    e_all, f_all = errors(frames, pred)
    for ax, title in ((axes[0], f"energy per atom: RMSE {e_all:.3g} meV/atom"),
                      (axes[1], f"force components: RMSE {f_all:.3g} eV/Å")):
        lo, hi = (min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1]))
        ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.8, ls="--", zorder=0)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", title=title)
    axes[0].set(xlabel="reference energy − composition mean (meV/atom)",
                ylabel="ensemble energy − same mean (meV/atom)")
    axes[1].set(xlabel="reference force (eV/Å)", ylabel="ensemble force (eV/Å)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(keys)), fontsize=9, title="exploration condition", frameon=False)
    fig.tight_layout()
    page.figure(fig, "parity.png", f"Final ensemble (iteration {final}) against the reference labels on the "
                "held-out frames. Energy error bars: the members' standard deviation; the dashed line is perfect "
                "agreement.")


def _err_cells(frames, pred, member, ident) -> list[str]:
    e, f = errors(frames, pred, member=member)
    return [_num(e, f"rmse-e-{ident}"), _num(f, f"rmse-f-{ident}")]


def _history(page, state, camp, frames, pred, final) -> None:
    """Every trained iteration's ensemble on the same held-out labels, against its training-set size; without
    held-out labels (select.holdout 0, or a campaign older than it), model 0's error on its own new labels."""
    points = []
    if final is not None and frames:
        members = camp.cfg["train"]["ensemble_size"]
        for it in range(final + 1):
            if state.one("SELECT COUNT(*) FROM tasks WHERE kind='train' AND status='done' AND iteration=?",
                         it) < members:
                continue
            p = pred if it == final else predict(load_ensemble(camp, it), frames)
            # what iteration it trained on: the labels committed before its training, less the held-out ones
            n = state.one("SELECT COUNT(*) FROM labels l WHERE (l.iteration < ? OR l.frame_id IS NULL) "
                          "AND l.label_id NOT IN (SELECT label_id FROM holdout)", it)
            points.append((it, n, *errors(frames, p)))
        xlabel = "campaign labels in the training set"
        caption = ("Held-out error of each iteration's ensemble (mean of its members) against the number of labels "
                   "it trained on; all points use the same held-out labels.")
    else:
        points = [(r["iteration"], r["total_labels"], 1000 * (r["val_rmse_e"] or np.nan), r["val_rmse_f"])
                  for r in state.q("SELECT * FROM iterations WHERE val_rmse_f IS NOT NULL ORDER BY iteration")]
        xlabel = "labels so far"
        caption = ("No held-out labels: each iteration's model 0 on the labels its own exploration chose, the "
                   "frames it was least sure of (a biased sample: larger errors than typical frames).")
    if not points:
        return
    fig, axes = page.plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, j, what in ((axes[0], 2, "energy RMSE (meV/atom)"), (axes[1], 3, "force RMSE (eV/Å)")):
        ax.plot([p[1] for p in points], [p[j] for p in points], "o-", color="#1f77b4")
        for p in points:
            ax.annotate(f"iteration {p[0]}", (p[1], p[j]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=xlabel, ylabel=what)
        ax.set_ylim(0, 1.2 * np.nanmax([p[j] for p in points] + [1e-12]))
        ax.margins(x=0.12)
    fig.tight_layout()
    page.add("<h2>Error as the labels grew</h2>")
    page.figure(fig, "labels_vs_error.png", caption)


def _learning_curves(page, camp, final, members) -> None:
    """lcurve.out of every final member; with init_from_previous, each member's earlier iterations too."""
    if final is None:
        return
    first = 0 if camp.cfg["train"]["init_from_previous"] else final
    fig, axes = page.plt.subplots(1, 2, figsize=(11, 3.6))
    colours = page.plt.get_cmap("tab10")
    found = False
    for k in range(members):
        offset = 0
        for it in range(first, final + 1):
            lc = read_lcurve(camp.model_path(it, k).parent / "lcurve.out")
            if lc is None or "step" not in lc:
                continue
            found = True
            for ax, col, scale in ((axes[0], "rmse_e", 1000), (axes[1], "rmse_f", 1)):
                for split, ls in (("trn", "-"), ("val", "--")):
                    if f"{col}_{split}" in lc:
                        ax.plot(offset + lc["step"], scale * lc[f"{col}_{split}"], ls, color=colours(k % 10), lw=1,
                                label=f"m{k} {'training' if split == 'trn' else 'validation'} data"
                                if it == final else None)
            if k == 0 and it > first:
                for ax in axes:
                    ax.axvline(offset, color="0.6", lw=0.6, ls=":")
            offset += int(lc["step"][-1])
    if not found:
        page.plt.close(fig)
        return
    axes[0].set(ylabel="energy RMSE (meV/atom)", yscale="log")
    axes[1].set(ylabel="force RMSE (eV/Å)", yscale="log")
    for ax in axes:
        ax.set(xlabel="training step" + (" (iterations one after another)" if first < final else ""))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, 2 * members), fontsize=9, frameon=False)
    fig.tight_layout()
    page.add("<h2>Learning curves of the final members</h2>")
    page.figure(fig, "lcurve.png", "lcurve.out of each final member, on its training batches"
                + (" from iteration 0 on: each iteration starts from the previous one's model (dotted lines)"
                   if first < final else "") + ".")


def _exploration(page, state, cfg, rows, conditions) -> None:
    plt = page.plt
    its = [r["iteration"] for r in rows]
    page.add("<h2>Exploration</h2>")
    incidents = _incidents(state)
    stops = {it: len({r["task_id"] for r in incidents if r["iteration"] == it}) for it in its}
    # deviation classes per iteration; the legend beside the bars, not over them
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bottom = np.zeros(len(its))
    for cls, key in (("accurate", "accurate"), ("candidate", "candidate"), ("failed", "failed_frac")):
        v = np.array([r[key] or 0.0 for r in rows])
        ax.bar(its, v, bottom=bottom, color=CLASS_COLOURS[cls], label=cls, width=0.7)
        for x, b, h in zip(its, bottom, v):
            if h >= 0.08:
                ax.text(x, b + h / 2, f"{100 * h:.0f} %", ha="center", va="center", fontsize=8, color="white")
        bottom += v
    for x in its:
        if stops[x]:
            ax.text(x, 1.02, f"{stops[x]} MD run{'s' * (stops[x] > 1)} stopped", ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="iteration", ylabel="fraction of explored frames", ylim=(0, 1.12), xticks=its,
           yticks=[0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    page.figure(fig, "fractions.png", "Explored frames per class: accurate (max force deviation < lo), candidate "
                "(lo ≤ deviation < hi, may be labelled), failed (≥ hi). Runs that stopped early are listed under "
                "Incidents.")
    _deviation_histograms(page, state, cfg, its)
    _selected_per_condition(page, state, conditions, its)
    page.add("<h3>Incidents: exploration runs that stopped early</h3>")
    if not incidents:
        page.add("<p class='note'>None: every exploration run reached its last step.</p>")
    else:
        table = []
        for r in incidents:
            key = conditions.key(r["structure"], r["temperature"], r["pressure"], r["stage"])
            where = Conditions.name(key) if r["structure"] else r.get("unnamed", "(the whole batch: no system named)")
            table.append([str(r["iteration"]), html.escape(r["stage"]), html.escape(where), _num(r["step"], fmt="d"),
                          f"<td class='msg'>{html.escape(r['message'])}</td>"])
        page.add("<p class='note'>A batched exploration run stops as a whole: its other trajectories end at the "
                 "same step. Frames recorded before the stop are kept.</p>",
                 _table(["iteration", "stage", "condition", "MD step", "message"], table))
    failed = state.q("SELECT iteration, task_id, reason FROM tasks WHERE kind='label' AND status='failed' "
                     "ORDER BY iteration, task_id")
    page.add("<h3>Incidents: label tasks that gave no label</h3>")
    if not failed:
        page.add("<p class='note'>None: every selected frame was labelled.</p>")
    else:   # an SCF that did not converge, a crashed code, a label over the filters' bounds
        page.add("<p class='note'>These frames never entered the data.</p>",
                 _table(["iteration", "task", "reason"], [[str(r["iteration"]), html.escape(r["task_id"]),
                                                          f"<td class='msg'>{html.escape(r['reason'] or '')}</td>"]
                                                         for r in failed]))


def _incidents(state) -> list[dict]:
    """The incidents table; a database older than it has the stops only in its explore tasks' notes."""
    if state.has_table("incidents"):
        return [dict(r) for r in state.q("SELECT * FROM incidents ORDER BY incident_id")]
    found = []
    for r in state.q("SELECT task_id, iteration, result FROM tasks WHERE kind='explore' AND status='done' "
                     "AND result LIKE '%stopped early%' ORDER BY task_id"):
        message = json.loads(r["result"])["note"].removeprefix("stopped early: ")
        at = re.match(r"step (\d+):", message)
        found.append({"task_id": r["task_id"], "iteration": r["iteration"], "step": at and int(at[1]),
                      "stage": r["task_id"].split("-explore-")[1].rsplit("-g", 1)[0], "message": message,
                      "structure": None, "temperature": None, "pressure": None,
                      "unnamed": "(not recorded by the version that ran it)"})
    return found


def _deviation_histograms(page, state, cfg, its) -> None:
    """One small panel per iteration (shared axes) instead of overlaid histograms."""
    plt = page.plt
    lo, hi = cfg.get("trust", {}).get("lo"), cfg.get("trust", {}).get("hi")
    values = {it: np.array([r[0] for r in state.q("SELECT max_devi_f FROM frames WHERE iteration=? AND "
                                                    "max_devi_f > 0", it)]) for it in its}
    shown = [it for it in its if len(values[it])]
    if not shown:
        return
    allv = np.concatenate([values[it] for it in shown])
    edges = [v for v in (lo, hi) if v]
    bins = np.logspace(np.log10(min(allv.min(), *edges)) - 0.1, np.log10(max(allv.max(), *edges)) + 0.1, 30)
    ncols = min(3, len(shown))
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 2.3 * nrows + 0.4), sharex=True, sharey=True,
                             squeeze=False)
    for ax, it in zip(axes.flat, shown):
        v = values[it]
        if lo is not None and hi:   # coloured by class, as in the fractions chart
            parts = [v[v < lo], v[(v >= lo) & (v < hi)], v[v >= hi]]
            ax.hist(parts, bins=bins, stacked=True, color=list(CLASS_COLOURS.values()), label=list(CLASS_COLOURS))
        else:
            ax.hist(v, bins=bins, color="#1f77b4")
        for level in edges:
            ax.axvline(level, color="k", ls="--", lw=0.8)
        ax.set_title(f"iteration {it} ({len(values[it])} frames)", fontsize=9)
        ax.set_xscale("log")
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes.flat[:len(shown)]):
        if i + ncols >= len(shown):   # the lowest panel of its column
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("max force deviation (eV/Å)")
    for ax in axes[:, 0]:
        ax.set_ylabel("frames")
    fig.tight_layout()
    if lo is not None and hi:
        axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    page.figure(fig, "devi_hist.png", "Max force deviation of the ensemble on the explored frames, one panel per "
                "iteration, coloured by class; dashed: the trust levels lo and hi"
                + (f" ({lo:g} and {hi:g} eV/Å)" if lo is not None and hi else "") + ".")


def _selected_per_condition(page, state, conditions, its) -> None:
    counts: dict = {}
    for r in state.q("SELECT iteration, stage, structure, temperature, pressure, COUNT(*) AS n, "
                     "SUM(class='candidate' AND filter IS NULL) AS cand, SUM(selected) AS sel FROM frames "
                     "GROUP BY iteration, stage, structure, temperature, pressure"):
        key = conditions.key(r["structure"], r["temperature"], r["pressure"], r["stage"])
        c = counts.setdefault(key, {}).setdefault(r["iteration"], [0, 0, 0])
        c[0], c[1], c[2] = c[0] + (r["sel"] or 0), c[1] + (r["cand"] or 0), c[2] + r["n"]
    if not counts:
        return
    table = []
    for key in sorted(counts, key=Conditions.order):
        cells = [f"<td class='n'>{'/'.join(map(str, counts[key][it]))}</td>" if it in counts[key] else "<td></td>"
                 for it in its]
        total = [sum(c[j] for c in counts[key].values()) for j in range(3)]
        table.append([html.escape(Conditions.name(key)), *cells, f"<td class='n'>{'/'.join(map(str, total))}</td>"])
    page.add("<h3>Frames per exploration condition</h3>",
             "<p class='note'>Each cell: selected for labelling / candidates that passed the filters / explored "
             "frames.</p>",
             _table(["condition", *[f"iteration {it}" for it in its], "all"], table))


def _times(page, state, rows) -> None:
    its = [r["iteration"] for r in rows]
    if not its:
        return
    fig, ax = page.plt.subplots(figsize=(8, 3.4))
    bottom = np.zeros(len(its))
    table = []
    for stage in STAGES:
        secs = np.array([state.one("SELECT seconds FROM stages WHERE iteration=? AND stage=?", it, stage) or 0.0
                         for it in its])
        ax.bar(its, secs, bottom=bottom, label=stage, width=0.7)
        bottom += secs
        table.append([stage, *[_num(s, fmt=".1f") for s in secs], _num(secs.sum(), fmt=".1f")])
    table.append(["<b>all</b>", *[_num(s, fmt=".1f") for s in bottom], _num(bottom.sum(), fmt=".1f")])
    ax.set(xlabel="iteration", ylabel="wall time (s)", xticks=its)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    page.add("<h2>Time per stage</h2>")
    page.figure(fig, "stage_times.png", "Wall time of each stage per iteration (seconds; a resumed stage adds up its "
                "runs).")
    page.add(_table(["stage (seconds)", *[f"iteration {it}" for it in its], "all"], table))
