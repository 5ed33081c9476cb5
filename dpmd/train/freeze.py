"""`dpmd freeze`: a training checkpoint -> one self-contained model file (weights, type_map, rcut, sel,
statistics, version), loadable with dpmd.model.load_model without the training input."""

from __future__ import annotations

from pathlib import Path

from dpmd.model import DeepPot, save_model
from dpmd.train.checkpoint import latest_checkpoint, load_checkpoint


def freeze(checkpoint: str | Path | None, output: str | Path) -> Path:
    path = Path(checkpoint) if checkpoint else latest_checkpoint(".")
    if path.is_dir():
        path = latest_checkpoint(path)
    ckpt = load_checkpoint(path)
    model = DeepPot(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    save_model(model.eval(), output)
    return path
