"""Constants of the hard-concrete distribution (Louizos et al., 2018), in one place.

Every op, kernel and trainer reads them from a :class:`HardConcreteParams`; nothing else
in the package spells out beta, the stretch interval or eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HardConcreteParams:
    """beta: temperature; (left, right): stretch interval, left < 0 < 1 < right;
    eps: u is drawn from U(eps, 1 - eps) so that log u and log(1 - u) stay finite."""

    beta: float = 2.0 / 3.0
    left: float = -0.1
    right: float = 1.1
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"HardConcreteParams.beta: expected a finite number > 0, got {self.beta!r}")
        if not (math.isfinite(self.left) and self.left < 0):
            raise ValueError(f"HardConcreteParams.left: expected a finite number < 0, got {self.left!r}")
        if not (math.isfinite(self.right) and self.right > 1):
            raise ValueError(f"HardConcreteParams.right: expected a finite number > 1, got {self.right!r}")
        if not (0 < self.eps < 0.5):
            raise ValueError(f"HardConcreteParams.eps: expected a number in (0, 0.5), got {self.eps!r}")

    @property
    def log_ratio(self) -> float:
        """log(-left / right): the shift in P(z != 0) = sigmoid(log_alpha - beta * log_ratio)."""
        return math.log(-self.left / self.right)


DEFAULT_PARAMS = HardConcreteParams()


def resolve(params: HardConcreteParams | None) -> HardConcreteParams:
    if params is None:
        return DEFAULT_PARAMS
    if not isinstance(params, HardConcreteParams):
        raise ValueError(f"params: expected a HardConcreteParams or None, got {type(params).__name__}")
    return params
