"""Hard-concrete masks in Triton: elementwise forward and backward kernels and launchers.

The maths (ARCHITECTURE.md §2; Louizos et al., 2018), per entry of log_alpha:

    u ~ U(eps, 1 - eps)                                   given, or Philox: tl.rand(seed, offset + i)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)  training
    s = sigmoid(log_alpha)                                 deterministic
    v = s * (right - left) + left;  z = clamp(v, 0, 1)
    dz/dlog_alpha = (right - left) * s * (1 - s) [/ beta when training], 0 where 0 <= v <= 1 fails

The gradient passes where 0 <= v <= 1 inclusive, torch.clamp's autograd convention, so the
kernels agree with `hard_concrete_reference` differentiated by autograd.

Shapes: log_alpha any shape (float32, contiguous), u the same shape or None, z and
grad_log_alpha the same shape, float32. ``offset`` places entry i at position offset + i
of the seed's Philox stream (edge masks 0..R*W-1, node masks R*W.., see ops/backends).

The jit helpers `_hard_concrete_s` and `_hard_concrete_z` are shared with the fused
edge_mix kernel (edge_mix.py), so a seed gives the same bits in both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _hard_concrete_s(la, u_ptr, idx, mask, seed, rand_offs, beta, eps,
                     TRAINING: tl.constexpr, USE_SEED: tl.constexpr):
    """s = the sigmoid before the stretch, for a block of log_alpha (any tile shape)."""
    if TRAINING:
        if USE_SEED:
            # Philox counter = position in the seed's stream; rand is U[0, 1)
            u = eps + (1.0 - 2.0 * eps) * tl.rand(seed, rand_offs)
        else:
            u = tl.load(u_ptr + idx, mask=mask, other=0.5).to(tl.float32)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + la) / beta)
    else:
        s = tl.sigmoid(la)
    return s


@triton.jit
def _hard_concrete_z(la, u_ptr, idx, mask, seed, rand_offs, beta, scale, left, eps,
                     TRAINING: tl.constexpr, USE_SEED: tl.constexpr):
    """z = clamp(s * (right - left) + left, 0, 1); scale = right - left."""
    s = _hard_concrete_s(la, u_ptr, idx, mask, seed, rand_offs, beta, eps, TRAINING, USE_SEED)
    return tl.minimum(tl.maximum(s * scale + left, 0.0), 1.0)


@triton.jit(do_not_specialize=["seed", "offset"])
def _hard_concrete_fwd_kernel(z_ptr, la_ptr, u_ptr, N, seed, offset, beta, scale, left, eps,
                              TRAINING: tl.constexpr, USE_SEED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    la = tl.load(la_ptr + offs, mask=mask, other=0.0)
    z = _hard_concrete_z(la, u_ptr, offs, mask, seed, offset + offs, beta, scale, left, eps, TRAINING, USE_SEED)
    tl.store(z_ptr + offs, z, mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _hard_concrete_bwd_kernel(grad_la_ptr, grad_z_ptr, la_ptr, u_ptr, N, seed, offset, beta, scale, left, eps,
                              TRAINING: tl.constexpr, USE_SEED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    la = tl.load(la_ptr + offs, mask=mask, other=0.0)
    g = tl.load(grad_z_ptr + offs, mask=mask, other=0.0)
    s = _hard_concrete_s(la, u_ptr, offs, mask, seed, offset + offs, beta, eps, TRAINING, USE_SEED)
    v = s * scale + left
    # the order of autograd's chain rule: clamp, * (right - left), sigmoid', / beta
    d = g * scale
    d = d * (1.0 - s) * s
    if TRAINING:
        d = d / beta
    d = tl.where((v >= 0.0) & (v <= 1.0), d, 0.0)
    tl.store(grad_la_ptr + offs, d, mask=mask)


def kernel_args(u: torch.Tensor | None, seed: int | None, training: bool, params) -> dict:
    """The arguments every hard-concrete kernel takes: the parameters and the noise mode.
    ``params`` is an ops.params.HardConcreteParams (duck-typed: kernels import no package code)."""
    use_seed = training and u is None
    if use_seed and seed is None:
        raise ValueError("seed: expected an int when training=True and u is None, got None")
    return dict(seed=int(seed) if use_seed else 0, beta=float(params.beta), scale=float(params.right - params.left),
                left=float(params.left), eps=float(params.eps), TRAINING=bool(training), USE_SEED=use_seed)


def _flat_u(u: torch.Tensor | None, like: torch.Tensor, training: bool) -> torch.Tensor:
    # a real tensor for the pointer slot even when the kernel never reads it
    if training and u is not None:
        return u.reshape(-1).to(torch.float32).contiguous()
    return like


def hard_concrete_forward(log_alpha: torch.Tensor, u: torch.Tensor | None, seed: int | None, offset: int,
                          training: bool, params) -> torch.Tensor:
    """z (float32, log_alpha's shape) from log_alpha and u, or Philox noise from (seed, offset)."""
    la = log_alpha.reshape(-1).to(torch.float32).contiguous()
    z = torch.empty_like(la)
    n = la.numel()
    if n:
        _hard_concrete_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            z, la, _flat_u(u, la, training), n, offset=int(offset), BLOCK=_BLOCK,
            **kernel_args(u, seed, training, params))
    return z.view(log_alpha.shape)


def hard_concrete_backward(grad_z: torch.Tensor, log_alpha: torch.Tensor, u: torch.Tensor | None, seed: int | None,
                           offset: int, training: bool, params) -> torch.Tensor:
    """grad_log_alpha (float32, log_alpha's shape) = grad_z * dz/dlog_alpha, s recomputed."""
    la = log_alpha.reshape(-1).to(torch.float32).contiguous()
    g = grad_z.reshape(-1).to(torch.float32).contiguous()
    grad = torch.empty_like(la)
    n = la.numel()
    if n:
        _hard_concrete_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            grad, g, la, _flat_u(u, la, training), n, offset=int(offset), BLOCK=_BLOCK,
            **kernel_args(u, seed, training, params))
    return grad.view(log_alpha.shape)
