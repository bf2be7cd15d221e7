"""The C++ backend: the OpenMP CPU kernels of ``edgeprune_fast._C`` (csrc/) behind the
backend interface (ops/backends/__init__.py). The automatic choice on CPU tensors when built.

Serves CPU tensors: masks in float32 or float64, writer outputs in float32, bfloat16,
float16 or float64, with float32 arithmetic (float64 for float64 writers). It draws no
noise itself (``supports_seed = False``): for a seeded call, ops/ draws u from the seed on
the CPU (``uniform_from_seed``) and passes it, so a seed gives the same masks here and in
the reference backend. The maths is ARCHITECTURE.md §2; the kernels are csrc/edge_mix.cpp
(tiled over columns, no [R, W, M] or full difference temporaries, deterministic reductions)
and csrc/hard_concrete.cpp.
"""

from __future__ import annotations

import torch

from ... import _native

_MASKS = (torch.float32, torch.float64)
_WRITERS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CppBackend:
    name = "cpp"
    supports_seed = False

    def unavailable(self, op, tensors):
        why = []
        if _native.load() is None:
            why.append(_native.load_error())
        devices = sorted({t.device.type for t in tensors if t.device.type != "cpu"})
        if devices:
            why.append(f"tensors on {', '.join(devices)}: its kernels run on CPU tensors")
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype not in _WRITERS})
        if dtypes:
            why.append(f"its kernels take float32, float64, bfloat16 or float16, not {', '.join(dtypes)}")
        return why

    @staticmethod
    def _c():
        module = _native.load()
        if module is None:
            raise RuntimeError(f"the cpp backend cannot run: {_native.load_error()}")
        return module

    @staticmethod
    def _no_seed(seed):
        if seed is not None:
            raise RuntimeError("the cpp backend draws no noise from a seed (supports_seed=False): pass u")

    def hard_concrete_forward(self, log_alpha, u, seed, offset, training, params):
        self._no_seed(seed)
        return self._c().hard_concrete_forward(log_alpha, u, training, params.beta, params.left, params.right)

    def hard_concrete_backward(self, grad_z, log_alpha, u, seed, offset, training, params):
        self._no_seed(seed)
        return self._c().hard_concrete_backward(grad_z.to(log_alpha.dtype).contiguous(), log_alpha, u, training,
                                                params.beta, params.left, params.right)

    def edge_mix_forward(self, la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params,
                         base=None):
        self._no_seed(seed)
        return self._c().edge_mix_forward(la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, training,
                                          params.beta, params.left, params.right, base)

    def mix_forward(self, z, clean2d, corrupt2d, base=None):
        return self._c().mix_forward(z, clean2d, corrupt2d, base)

    def mix_backward(self, grad_x2d, z, clean2d, corrupt2d, grad_clean_out=None):
        return self._c().mix_backward(grad_x2d.to(clean2d.dtype).contiguous(), z, clean2d, corrupt2d, grad_clean_out)


BACKEND = CppBackend()
