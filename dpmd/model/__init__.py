"""DeepPot-SE model, its energy/force/virial wrapper, and model files."""

from dpmd.model.deeppot import DeepPot, normalize_model_config
from dpmd.model.forces import evaluate
from dpmd.model.io import load_model, save_model

__all__ = ["DeepPot", "evaluate", "load_model", "save_model", "normalize_model_config"]
