"""The fused ops of edgeprune_fast (the public contract):

hard_concrete, expected_l0, HardConcreteParams  -- masks (ops/hard_concrete.py)
edge_mix, mix                                    -- masked aggregation (ops/edge_mix.py)
"""

from .backends import BackendUnavailable, use_backend
from .edge_mix import edge_mix, edge_mix_reference, mix, mix_reference
from .hard_concrete import expected_l0, hard_concrete, hard_concrete_reference
from .params import HardConcreteParams

__all__ = [
    "BackendUnavailable",
    "HardConcreteParams",
    "edge_mix",
    "edge_mix_reference",
    "expected_l0",
    "hard_concrete",
    "hard_concrete_reference",
    "mix",
    "mix_reference",
    "use_backend",
]
