"""`dpmd freeze`: a training checkpoint -> one self-contained, deployable model file.

The file is a TorchScript archive (dpmd.model.export): weights, statistics, and a `dpmd.json`
metadata record (type_map, rcut, sel, the model config, dpmd/torch versions).  Python reads it
with dpmd.model.load_model (no training input needed), C++ with torch::jit::load.
"""

from __future__ import annotations

from pathlib import Path

from dpmd.model import DeepPot, save_model
from dpmd.train.checkpoint import check_finite, latest_checkpoint, load_checkpoint


def freeze(checkpoint: str | Path | None, output: str | Path) -> Path:
    path = Path(checkpoint) if checkpoint else latest_checkpoint(".")
    if path.is_dir():
        path = latest_checkpoint(path)
    ckpt = load_checkpoint(path)  # plain data only: a pickle that would run code is refused
    check_finite(ckpt["model"], path)
    model = DeepPot(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    save_model(model.eval(), output)  # TorchScript archive, written atomically
    return path
