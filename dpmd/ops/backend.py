"""The backend of one evaluation: which implementation runs, decided once (dpmd.ops.resolve) and passed down.

No `from __future__ import annotations` here: TorchScript reads a NamedTuple's field types from its
annotations and does not resolve them from strings (the frozen model takes Optional[Backend] arguments).
"""

from typing import NamedTuple


class Backend(NamedTuple):
    """What one evaluation may use; the model only reads these fields (the frozen model passes None: its
    choice is made when it is scripted, dpmd.model.export)."""
    kernels: bool      # the library's first-derivative ops: env matrix, contraction, tables, assembly (forces)
    any_order: bool    # its contraction ops that differentiate to any order (training, second derivatives)
    linearize: bool    # embedding nets linearised in s (dpmd.model.network): exact forces, no d2/dr2
    forces_only: bool  # no gradient to the weights is wanted (weight-only terms may be cached)
    triton: bool       # Triton's tabulated-embedding kernel (CUDA, no CUDA library)
    attention: bool = False  # the library's attention kernels, any order (CPU only: no CUDA version yet)


REFERENCE = Backend(kernels=False, any_order=False, linearize=False, forces_only=False, triton=False)
