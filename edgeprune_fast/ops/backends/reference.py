"""The reference backend: the plain PyTorch maths of ops/hard_concrete.py and
ops/edge_mix.py, with backward by autograd over a recomputation (always available)."""

from __future__ import annotations

import torch

from ..edge_mix import mix_reference
from ..hard_concrete import hard_concrete_reference


class ReferenceBackend:
    name = "reference"
    supports_seed = False

    def unavailable(self, op, tensors):
        return []

    def hard_concrete_forward(self, log_alpha, u, seed, offset, training, params):
        return hard_concrete_reference(log_alpha, u, training=training, params=params)

    def hard_concrete_backward(self, grad_z, log_alpha, u, seed, offset, training, params):
        with torch.enable_grad():
            la = log_alpha.detach().requires_grad_(True)
            z = hard_concrete_reference(la, u, training=training, params=params)
            (grad,) = torch.autograd.grad(z, la, grad_z)
        return grad

    def edge_mix_forward(self, la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params,
                         base=None):
        z_eff = self.hard_concrete_forward(la_edge, u_edge, seed, 0, training, params)
        if la_node is not None:
            z_eff = z_eff * self.hard_concrete_forward(la_node, u_node, seed, 0, training, params)[None, :]
        return mix_reference(z_eff, clean2d, corrupt2d, base), z_eff

    def mix_forward(self, z, clean2d, corrupt2d, base=None):
        return mix_reference(z, clean2d, corrupt2d, base)

    def mix_backward(self, grad_x2d, z, clean2d, corrupt2d, grad_clean_out=None):
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            cg = clean2d.detach().requires_grad_(True)
            x = mix_reference(zg, cg, corrupt2d)
            gz, gc = torch.autograd.grad(x, (zg, cg), grad_x2d)
        return gz, gc if grad_clean_out is None else grad_clean_out.add_(gc)


BACKEND = ReferenceBackend()
