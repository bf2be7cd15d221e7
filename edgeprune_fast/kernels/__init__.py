"""Triton kernels of edgeprune_fast (``edgeprune_fast.kernels``; not a top-level ``kernels``,
which is Hugging Face's package of that name, imported by transformers >= 5.25).

Each module holds one op's kernels and their launchers and imports only torch and triton:

    hard_concrete.py  hard_concrete_forward, hard_concrete_backward   (elementwise, Philox noise)
    edge_mix.py       edge_mix_forward, mix_forward, mix_backward      (fused sampling + mixing)

The maths is ARCHITECTURE.md §2; the launchers' signatures are those of the backend
interface (edgeprune_fast/ops/backends/__init__.py). Importing this package imports
triton; the kernels are compiled for CUDA, or interpreted on the CPU when TRITON_INTERPRET=1
was set when this package is imported (`triton.jit` reads it then; see `interpreted`).
"""

from .edge_mix import edge_mix_forward, mix_backward, mix_forward
from .hard_concrete import _hard_concrete_fwd_kernel, hard_concrete_backward, hard_concrete_forward


def interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (they then run on CPU tensors)."""
    return type(_hard_concrete_fwd_kernel).__name__ == "InterpretedFunction"


__all__ = ["edge_mix_forward", "hard_concrete_backward", "hard_concrete_forward", "interpreted", "mix_backward",
           "mix_forward"]
