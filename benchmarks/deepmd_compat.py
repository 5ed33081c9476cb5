"""Import DeePMD-kit's PyTorch backend where its op library was built for another torch.

DeePMD-kit's wheels carry `libdeepmd_op_pt.so` built against one torch release (3.2: torch 2.11) and refuse
to import under another.  The se_e2_a water model these benchmarks use needs none of those ops, and DeePMD-kit
skips loading the library when `torch.ops.deepmd.enable_mpi` already exists, so that placeholder is defined
first when (and only when) the versions differ.
"""

from __future__ import annotations

_placeholder = None


def prepare_deepmd_import() -> None:
    global _placeholder
    import torch
    from deepmd.env import GLOBAL_CONFIG   # plain constants: does not load the op library
    from packaging.version import Version

    built_for = GLOBAL_CONFIG.get("pt_version")
    if _placeholder is None and built_for and Version(built_for) != Version(Version(torch.__version__).public):
        _placeholder = torch.library.Library("deepmd", "DEF")    # kept alive for the process
        _placeholder.define("enable_mpi() -> ()")
