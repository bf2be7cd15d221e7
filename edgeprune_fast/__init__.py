"""edgeprune_fast: Edge Pruning (Bhaskar et al., 2024) with fused kernels.

Importing never fails for lack of a GPU, Triton or the compiled extension; see
``python -m edgeprune_fast.info`` for what is available and which backend serves each op.
"""

from . import ops
from .ops import HardConcreteParams, edge_mix, expected_l0, hard_concrete, mix

__version__ = "0.1.0"

__all__ = ["HardConcreteParams", "__version__", "edge_mix", "expected_l0", "hard_concrete", "mix", "ops"]
