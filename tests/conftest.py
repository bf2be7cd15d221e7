"""Shared test settings: deterministic seeds and small helpers."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be on before anything first imports triton (a library a test
    # module imports may do so during collection): set it here, so the Triton tests run on the
    # CPU whatever the collection order. The automatic backend choice never picks the
    # interpreter, so the other tests are unaffected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (much slower on busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def uniforms(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(0.01, 0.99) noise: keeps test samples away from the clamp edges' measure-zero kinks."""
    return 0.01 + 0.98 * torch.rand(*shape, generator=generator)
