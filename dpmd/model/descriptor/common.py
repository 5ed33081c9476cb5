"""Pieces every descriptor of the family builds the same way: size checks, the codes of excluded type pairs,
DeePMD-kit's per-slot statistics read back as per-type rows, and the cache of terms that depend on the weights
alone."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from dpmd.errors import ConfigError, DpmdError


def check_sizes(ntypes: int, sel: Optional[List[int]], rcut: float, rcut_smth: float) -> None:
    """sel (one count per type; None for a mixed-type descriptor) and the cut-offs of a descriptor's constructor."""
    if sel is not None and len(sel) != ntypes:
        raise ValueError(f"descriptor.sel has {len(sel)} entries but type_map has {ntypes} types")
    if not 0 <= rcut_smth < rcut:
        raise ValueError(f"descriptor: need 0 <= rcut_smth < rcut, got rcut_smth={rcut_smth}, rcut={rcut}")


def excluded_pair_codes(ntypes: int, exclude_types) -> List[int]:
    """centre type * ntypes + neighbour type of the pairs of exclude_types, both orders (from the config, not part
    of the weights); the -1 that no pair has keeps the list non-empty, which TorchScript needs."""
    return [-1] + sorted({a * ntypes + b for p in exclude_types for a, b in (p, p[::-1])})


def cached_on_weights(module, name: str, tensors: List[torch.Tensor], compute: Callable, extra: list = ()):
    """compute() (no gradient), kept in the module (a WeightCache) while `tensors` are the same storage at the same
    version (a load or an in-place edit bumps it), `extra` (plain attributes) is equal and the module has not
    changed mode; None for tensors under vmap (an ensemble), which are wrappers.  For eager inference only: the
    caller decides when no gradient to the weights is needed."""
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return None
    key = [(t.data_ptr(), t._version) for t in tensors] + list(extra)
    caches = module.__dict__.setdefault("_weight_caches", {})
    cached = caches.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, compute())
        caches[name] = cached
    return cached[1]


class WeightCache:
    """Mixin of a module with cached_on_weights terms: they are dropped whenever the module changes mode, so an
    optimizer that leaves the weights' version counters as they were (fused Adam) may step in train mode, as
    training does, between evaluations in eval mode, with no word to the module."""

    def train(self, mode: bool = True):
        self.__dict__.pop("_weight_caches", None)
        return super().train(mode)


def per_type_rows(name: str, value: torch.Tensor, source: str) -> torch.Tensor:
    """DeePMD-kit's mean / stddev (ntypes, nnei, k), one row per neighbour slot and equal for a type's slots, as
    (ntypes, k); a one-line error for a checkpoint whose slots differ."""
    if not torch.equal(value, value[:, :1].expand_as(value)):
        raise DpmdError(f"{source}: descriptor.{name} differs between neighbour slots; not supported")
    return value[:, 0, :]


def resolved_sel(d: dict):
    """The sel of a normalised section, once `sel: auto` has been counted from data (dpmd.train does it)."""
    if isinstance(d["sel"], str):
        raise ConfigError("model.descriptor.sel is 'auto': resolve it from data first (dpmd.train does)")
    return d["sel"]
