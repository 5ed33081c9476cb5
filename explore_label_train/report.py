"""`elt status` (a table) and `elt report` (PNG plots and an HTML page), read from the campaign database."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from explore_label_train.campaign import STAGES
from explore_label_train.state import State


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
    return "\n".join(lines)


def write_report(state: State, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = state.get_meta("config", {})
    lo, hi = cfg.get("trust", {}).get("lo"), cfg.get("trust", {}).get("hi")
    rows = status_rows(state)
    its = [r["iteration"] for r in rows]
    images = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        images.append((title, name))

    # 1. accurate / candidate / failed fractions per iteration
    fig, ax = plt.subplots(figsize=(6, 3.5))
    acc = np.array([r["accurate"] or 0 for r in rows])
    cand = np.array([r["candidate"] or 0 for r in rows])
    fail = np.array([r["failed_frac"] or 0 for r in rows])
    ax.bar(its, acc, color="tab:green", label="accurate")
    ax.bar(its, cand, bottom=acc, color="tab:orange", label="candidate")
    ax.bar(its, fail, bottom=acc + cand, color="tab:red", label="failed")
    ax.set(xlabel="iteration", ylabel="fraction of explored frames", ylim=(0, 1.05), xticks=its)
    ax.legend(fontsize=8)
    save(fig, "fractions.png", "Accurate / candidate / failed fractions")

    # 2. max_devi_f histograms with the trust levels
    fig, ax = plt.subplots(figsize=(6, 3.5))
    allv = [r[0] for r in state.q("SELECT max_devi_f FROM frames WHERE max_devi_f > 0")]
    if allv:
        bins = np.logspace(np.log10(min(allv)) - 0.1, np.log10(max(allv)) + 0.1, 40)
        for it in its:
            v = [r[0] for r in state.q("SELECT max_devi_f FROM frames WHERE iteration=? AND max_devi_f > 0", it)]
            if v:
                ax.hist(v, bins=bins, histtype="step", label=f"iteration {it}")
        ax.set_xscale("log")
    for level, name in ((lo, "lo"), (hi, "hi")):
        if level:
            ax.axvline(level, color="k", ls="--", lw=1)
            ax.text(level, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, va="top")
    ax.set(xlabel="max_devi_f (eV/Å)", ylabel="frames")
    if allv:
        ax.legend(fontsize=8)
    save(fig, "devi_hist.png", "max_devi_f per iteration vs trust levels")

    # 3. labels so far vs validation error
    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(r["total_labels"], r["val_rmse_f"]) for r in rows if r["val_rmse_f"] is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set(xlabel="labels so far", ylabel="force RMSE on the new labels (eV/Å)")
    save(fig, "labels_vs_error.png",
         "Labels so far vs validation error (model 0 on the labels its exploration produced)")

    # 4. time per stage
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(its))
    table = []
    for stage in STAGES:
        secs = np.array([state.one("SELECT seconds FROM stages WHERE iteration=? AND stage=?", it, stage) or 0.0
                         for it in its])
        ax.bar(its, secs, bottom=bottom, label=stage)
        bottom += secs
        table.append((stage, secs))
    ax.set(xlabel="iteration", ylabel="seconds", xticks=its)
    ax.legend(fontsize=8)
    save(fig, "stage_times.png", "Time per stage")

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>elt campaign report</title>",
             "<style>body{font-family:sans-serif;margin:2em} td,th{padding:2px 8px;text-align:right} "
             "table{border-collapse:collapse} tr:nth-child(even){background:#f2f2f2}</style></head><body>",
             f"<h1>Campaign report: {html.escape(str(cfg.get('work_dir', '')))}</h1>",
             f"<p>trust levels: lo = {lo}, hi = {hi} eV/Å; labeller: "
             f"{html.escape(json.dumps(cfg.get('labeller', {})))}</p>",
             "<h2>Status</h2><pre>" + html.escape(status_table(state)) + "</pre>"]
    parts.append("<h2>Seconds per stage</h2><table><tr><th>stage</th>" +
                 "".join(f"<th>iter {it}</th>" for it in its) + "</tr>")
    for stage, secs in table:
        parts.append(f"<tr><td>{stage}</td>" + "".join(f"<td>{s:.1f}</td>" for s in secs) + "</tr>")
    parts.append("</table>")
    for title, img in images:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{img}'>")
    parts.append("</body></html>")
    page = out_dir / "report.html"
    page.write_text("\n".join(parts))
    return page
