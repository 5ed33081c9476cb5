"""DPA-1 with stripped, smooth type embedding (`se_atten_v2`): se_atten (se_atten.py) in strip mode with
smooth_type_embedding, as DeePMD-kit's DescrptSeAttenV2 fixes them; its own keys' defaults (set_davg_zero
false)."""

from __future__ import annotations

from dpmd.model.descriptor import se_atten
from dpmd.model.descriptor.se_atten import DescriptorSeAtten


def args() -> list:
    """The keys of a `se_atten_v2` section (DeePMD-kit's argcheck: se_atten's without the type-embedding mode)."""
    return se_atten.common_args(set_davg_zero=False)


check_config = se_atten.check_config


class DescriptorSeAttenV2(DescriptorSeAtten):
    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorSeAttenV2":
        return cls._build(d, ntypes, "strip", True)
