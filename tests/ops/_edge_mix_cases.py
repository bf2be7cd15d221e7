"""Inputs and the plain-torch runs that the backend tests (C++, Triton) share."""

from __future__ import annotations

import torch

from edgeprune_fast.ops import hard_concrete_reference


def uniform_noise(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    # away from 0 and 1 so the clamp's kinks (measure zero) are not hit by rounding
    return (0.01 + 0.98 * torch.rand(*shape)).to(device, dtype)


def edge_mix_inputs(R, W, N, D, *, corrupted, node, dtype=torch.float32, mask_dtype=torch.float32, device="cpu"):
    """(log_alpha_edge, log_alpha_node, clean, corrupt, u_edge, u_node), with clamps active at 1 and at 0."""
    la = (torch.randn(R, W) * 1.5).to(device, mask_dtype)
    la[0, 0] = 9.0  # clamp active at 1 (training and deterministic)
    la[-1, -1] = -9.0  # clamp active at 0
    ln = (torch.randn(W) * 1.5).to(device, mask_dtype) if node else None
    clean = torch.randn(W, N, D).to(device, dtype)
    corrupt = torch.randn(W, N, D).to(device, dtype) if corrupted else None
    un = uniform_noise(W, dtype=mask_dtype, device=device) if node else None
    return la, ln, clean, corrupt, uniform_noise(R, W, dtype=mask_dtype, device=device), un


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def run_edge_mix(fn, la, ln, clean, corrupt, ue, un, training, wx, wz):
    """(x, z_eff, grad la_edge, grad la_node, grad clean) of loss = <x, wx> + <z_eff, wz>."""
    la, ln, clean = leaves(la, ln, clean)
    x, z = fn(la, clean, corrupt, log_alpha_node=ln, u_edge=ue if training else None,
              u_node=un if training else None, training=training)
    ((x.to(wx.dtype) * wx).sum() + (z.to(wz.dtype) * wz).sum()).backward()
    return x.detach(), z.detach(), la.grad, None if ln is None else ln.grad, clean.grad


def torch_low_precision(la, ln, clean, corrupt, ue, un, wx, wz):
    """What plain torch computes in the low dtype: fp32 masks, mixing einsums in clean's dtype."""
    la, ln, clean = leaves(la, ln, clean)
    z = hard_concrete_reference(la, ue) * hard_concrete_reference(ln, un)[None, :]
    dt = clean.dtype
    x = torch.einsum("rw,w...->r...", z.to(dt), clean)
    if corrupt is not None:
        x = x + torch.einsum("rw,w...->r...", (1 - z).to(dt), corrupt)
    ((x.float() * wx).sum() + (z * wz).sum()).backward()
    return x.detach(), z.detach(), la.grad, ln.grad, clean.grad
