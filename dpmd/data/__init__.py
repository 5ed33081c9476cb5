"""Training data: DeePMD-kit deepmd/npy (ordinary and mixed-type) and HDF5 systems, and DFT-output conversion."""

from dpmd.data.convert import convert
from dpmd.data.system import (System, check_params, find_systems, load_system, load_systems, source_groups,
                              write_system)

__all__ = ["System", "load_system", "load_systems", "find_systems", "write_system", "check_params", "source_groups",
           "convert"]
