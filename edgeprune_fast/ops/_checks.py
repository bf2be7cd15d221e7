"""Argument checks shared by the ops: each failure is a ValueError that names the argument,
what was expected and what came."""

from __future__ import annotations

import torch

from .params import HardConcreteParams

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(name: str, x, *, ndim_min: int = 0, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, bfloat16, float16 or float64, got {describe(x)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {describe(x)}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimensions, got {describe(x)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} non-finite of {x.numel()} ({describe(x)})")


def check_u(name: str, u, shape: tuple, params: HardConcreteParams) -> None:
    check_tensor(name, u)
    if tuple(u.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {describe(u)}")
    if u.numel() and not bool(((u > 0) & (u < 1)).all()):
        raise ValueError(f"{name}: expected uniforms strictly inside (0, 1), got values outside in {describe(u)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in given.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    return seed
