"""Shared test settings: deterministic seeds and small helpers."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def uniforms(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(0.01, 0.99) noise: keeps test samples away from the clamp edges' measure-zero kinks."""
    return 0.01 + 0.98 * torch.rand(*shape, generator=generator)
