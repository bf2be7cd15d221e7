"""The Triton backend: the fused kernels of edgeprune_fast.kernels behind the backend
interface (ops/backends/__init__.py), with Philox noise drawn inside the kernels.

Serves float32, bfloat16 and float16 tensors on CUDA, and CPU tensors when Triton's
interpreter is on (TRITON_INTERPRET=1 set before the kernels are first used: Triton reads it
when edgeprune_fast.kernels is imported). float64 is left to
the C++ and reference backends. Triton is imported only when a call is about to be served,
so importing this module, or asking it why it cannot serve a CPU call, costs nothing.
The maths is ARCHITECTURE.md §2; the kernels document their grids and memory traffic.

The kernels are the subpackage ``edgeprune_fast.kernels`` (edgeprune_fast/kernels/), so an
installed package and a checkout on PYTHONPATH (bench/gpu_check.sh) import them alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

_SERVED = (torch.float32, torch.bfloat16, torch.float16)
_TRUE = ("1", "true", "on", "yes")
_NAME = "edgeprune_fast.kernels"


def load_kernels():
    """edgeprune_fast.kernels (imports triton: only when a call is about to be served)."""
    return importlib.import_module(_NAME)


class TritonBackend:
    name = "triton"
    supports_seed = True

    def __init__(self) -> None:
        self._kernels = None
        self._load_error: str | None = None

    def _load(self):
        """edgeprune_fast.kernels, imported once; None (and the reason kept) if it fails."""
        if self._kernels is None and self._load_error is None:
            try:
                self._kernels = load_kernels()
            except Exception as exc:  # report through unavailable(), never raise on import
                self._load_error = f"{type(exc).__name__}: {exc}"
        return self._kernels

    def _interpreter_on(self) -> bool:
        if self._kernels is not None:
            return self._kernels.interpreted()  # what the kernels were built as, whatever the env says now
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE

    def unavailable(self, op, tensors):
        why = []
        try:
            installed = importlib.util.find_spec("triton") is not None
        except Exception:  # a broken or hidden installation
            installed = False
        if not installed:
            why.append("Triton is not installed or cannot be imported (pip install triton)")
        elif self._load_error is not None:
            why.append(f"the Triton kernels failed to import ({self._load_error})")
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype not in _SERVED})
        if dtypes:
            why.append(f"its kernels take float32, bfloat16 or float16, not {', '.join(dtypes)}")
        off_cuda = sorted({t.device.type for t in tensors if t.device.type != "cuda"})
        if off_cuda and not self._interpreter_on():
            why.append(f"tensors on {', '.join(off_cuda)}: Triton runs on CUDA tensors (or on the CPU with "
                       "TRITON_INTERPRET=1)")
        if not why and self._load() is None:
            why.append(f"the Triton kernels failed to import ({self._load_error})")
        elif not why and off_cuda and not self._interpreter_on():
            why.append("its kernels were built before TRITON_INTERPRET=1 was set, so they cannot run on the CPU")
        return why

    def _k(self):
        kernels = self._load()
        if kernels is None:
            raise RuntimeError(f"the Triton kernels failed to import ({self._load_error})")
        return kernels

    def hard_concrete_forward(self, log_alpha, u, seed, offset, training, params):
        return self._k().hard_concrete_forward(log_alpha, u, seed, offset, training, params)

    def hard_concrete_backward(self, grad_z, log_alpha, u, seed, offset, training, params):
        return self._k().hard_concrete_backward(grad_z, log_alpha, u, seed, offset, training, params)

    def edge_mix_forward(self, la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params,
                         base=None):
        return self._k().edge_mix_forward(la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params,
                                          base=base)

    def mix_forward(self, z, clean2d, corrupt2d, base=None):
        return self._k().mix_forward(z, clean2d, corrupt2d, base)

    def mix_backward(self, grad_x2d, z, clean2d, corrupt2d, grad_clean_out=None):
        return self._k().mix_backward(grad_x2d, z, clean2d, corrupt2d, grad_clean_out=grad_clean_out)


BACKEND = TritonBackend()
