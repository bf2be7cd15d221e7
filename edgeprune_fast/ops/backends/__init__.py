"""Backend choice: the only place that decides which implementation serves an op.

Backends, best first: ``triton`` (CUDA tensors; CPU tensors only when forced under
TRITON_INTERPRET=1), ``cpp`` (the compiled extension ``edgeprune_fast._C``, CPU), and
``reference`` (plain PyTorch from the maths, always available). The choice is automatic;
``EDGEPRUNE_BACKEND=<name>`` or ``with use_backend(name):`` forces one, and a forced
backend that cannot serve a call raises :class:`BackendUnavailable` listing every reason.

Each backend module exposes ``BACKEND``, an object with:

    name: str; supports_seed: bool (draws u from a seed inside its kernels)
    unavailable(op, tensors) -> list[str]                  reasons it cannot serve; [] if it can
    hard_concrete_forward(log_alpha, u, seed, offset, training, params) -> z
    hard_concrete_backward(grad_z, log_alpha, u, seed, offset, training, params) -> grad_log_alpha
    edge_mix_forward(la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params, base=None)
        -> (x2d [R, M] in clean's dtype, z_eff [R, W] float32)
    mix_forward(z, clean2d, corrupt2d, base=None) -> x2d
        base: None or [M] in the arithmetic dtype (float32; float64 for float64 writers),
        added to every reader's row before x is rounded to clean's dtype
    mix_backward(grad_x2d, z, clean2d, corrupt2d, grad_clean_out=None) -> (grad_z [R, W] float32, grad_clean2d)
        with grad_clean_out (a contiguous tensor like clean2d) grad_clean2d is added into it in
        place and it is returned

``offset`` is the position of log_alpha's first entry in the seed's stream: edge masks
use 0..R*W-1, node masks R*W..R*W+W-1, so one seed gives both.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

ENV_VAR = "EDGEPRUNE_BACKEND"
NAMES = ("triton", "cpp", "reference")
OPS = ("hard_concrete", "edge_mix", "mix")

_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_forced = threading.local()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve a call; the message lists why."""


def get(name: str):
    """The backend object ``name``, or None if its module failed to import (see load_error)."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {', '.join(NAMES)}, got {name!r}")
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}").BACKEND
        except Exception as exc:  # a missing optional dependency must never break import
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded.get(name)


def load_error(name: str) -> str | None:
    get(name)
    return _load_errors.get(name)


def forced_name() -> tuple[str | None, str]:
    name = getattr(_forced, "name", None)
    if name is not None:
        return name, "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None, ""
    if env not in NAMES:
        raise ValueError(f"{ENV_VAR}: expected one of auto, {', '.join(NAMES)}, got {env!r}")
    return env, f"{ENV_VAR}={env}"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend (None: automatic choice) inside the block, in this thread."""
    if name is not None:
        get(name)  # validates the name
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def reasons(name: str, op: str, tensors: list[torch.Tensor], *, auto: bool) -> list[str]:
    backend = get(name)
    if backend is None:
        return [f"could not be loaded ({_load_errors[name]})"]
    why = list(backend.unavailable(op, tensors))
    if auto and name == "triton" and not why and any(t.device.type != "cuda" for t in tensors):
        why.append("the automatic choice does not run Triton's interpreter on CPU tensors "
                   f"(force it with {ENV_VAR}=triton)")
    return why


def choose(op: str, tensors: list[torch.Tensor]):
    """The backend that serves ``op`` on these tensors."""
    name, how = forced_name()
    if name is not None:
        why = reasons(name, op, tensors, auto=False)
        if why:
            raise BackendUnavailable(f"backend {name!r} (forced by {how}) cannot serve {op}: " + "; ".join(why))
        return get(name)
    for candidate in NAMES:
        if not reasons(candidate, op, tensors, auto=True):
            return get(candidate)
    raise BackendUnavailable(f"no backend can serve {op}: " + "; ".join(
        f"{n}: {', '.join(reasons(n, op, tensors, auto=True))}" for n in NAMES))


def report(op: str, tensors: list[torch.Tensor]) -> list[tuple[str, list[str]]]:
    """For each backend, the reasons it would not serve ``op`` on these tensors (auto mode)."""
    return [(n, reasons(n, op, tensors, auto=True)) for n in NAMES]
