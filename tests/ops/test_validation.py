"""Bad input gets a ValueError naming the argument, what was expected and what came."""

import pytest
import torch

from edgeprune_fast.ops import HardConcreteParams, edge_mix, hard_concrete, mix


def _ok():
    return torch.randn(3, 5), torch.randn(5, 2, 4), torch.randn(5, 2, 4)


def test_clean_corrupt_shape_mismatch():
    la, clean, _ = _ok()
    with pytest.raises(ValueError, match=r"corrupt: expected the shape of clean \(5, 2, 4\), got .*\(5, 2, 3\)"):
        edge_mix(la, clean, torch.randn(5, 2, 3))


def test_writer_count_mismatch():
    la, _, _ = _ok()
    with pytest.raises(ValueError, match=r"clean: expected shape \[W, \*, D\] with W = 5 .*got .*\(4, 2, 4\)"):
        edge_mix(la, torch.randn(4, 2, 4))
    with pytest.raises(ValueError, match=r"clean: .*W = 3 \(z.shape\[1\]\)"):
        mix(torch.rand(2, 3), torch.randn(4, 2))


def test_log_alpha_shapes():
    _, clean, _ = _ok()
    with pytest.raises(ValueError, match="log_alpha_edge: expected 2 dimensions"):
        edge_mix(torch.randn(15), clean)
    with pytest.raises(ValueError, match=r"log_alpha_node: expected shape \(5,\)"):
        edge_mix(torch.randn(3, 5), clean, log_alpha_node=torch.randn(4))
    with pytest.raises(ValueError, match=r"u_edge: expected shape \(3, 5\)"):
        edge_mix(torch.randn(3, 5), clean, u_edge=torch.rand(5, 3))


def test_mixed_dtypes_and_devices():
    la, clean, corrupt = _ok()
    with pytest.raises(ValueError, match="corrupt: expected the dtype of clean"):
        edge_mix(la, clean, corrupt.to(torch.bfloat16))
    with pytest.raises(ValueError, match="expected all tensors on one device, got .*clean on meta"):
        edge_mix(la, clean.to("meta"), None)


def test_base_checks():
    la, clean, corrupt = _ok()
    with pytest.raises(ValueError, match=r"base: expected shape \(2, 4\) \(clean's without its writer dim\), got .*\(5, 2, 4\)"):
        edge_mix(la, clean, corrupt, base=clean)
    with pytest.raises(ValueError, match="base: expected a constant .*requires grad"):
        mix(torch.rand(3, 5), clean, base=torch.zeros(2, 4, requires_grad=True))
    with pytest.raises(ValueError, match="expected all tensors on one device, got clean on cpu, base on meta"):
        mix(torch.rand(3, 5), clean, base=torch.zeros(2, 4, device="meta"))


def test_non_finite_log_alpha():
    la, clean, corrupt = _ok()
    la[1, 2] = float("nan")
    with pytest.raises(ValueError, match="log_alpha_edge: expected finite values, got 1 non-finite"):
        edge_mix(la, clean, corrupt)
    with pytest.raises(ValueError, match="log_alpha: expected finite values"):
        hard_concrete(torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="log_alpha_node: expected finite values"):
        edge_mix(torch.randn(3, 5), clean, log_alpha_node=torch.tensor([0, 0, float("-inf"), 0, 0.0]))


def test_bad_noise_seed_and_params():
    la, clean, _ = _ok()
    with pytest.raises(ValueError, match=r"u_edge: expected uniforms strictly inside \(0, 1\)"):
        edge_mix(la, clean, u_edge=torch.ones(3, 5))
    with pytest.raises(ValueError, match="u_node: expected a tensor of shape"):
        edge_mix(la, clean, log_alpha_node=torch.zeros(5), u_edge=torch.rand(3, 5) * 0.5 + 0.2)
    with pytest.raises(ValueError, match="seed: expected an int"):
        hard_concrete(la, seed=-1)
    with pytest.raises(ValueError, match="HardConcreteParams.beta: expected a finite number > 0, got 0"):
        HardConcreteParams(beta=0)
    with pytest.raises(ValueError, match="params: expected a HardConcreteParams"):
        hard_concrete(la, params={"beta": 1})
    with pytest.raises(ValueError, match="clean: expected float32, bfloat16, float16 or float64"):
        edge_mix(la, torch.ones(5, 2, dtype=torch.int64))


def test_forced_backend_that_cannot_serve_lists_reasons(monkeypatch):
    from edgeprune_fast.ops import BackendUnavailable
    from edgeprune_fast.ops.backends import ENV_VAR

    la, clean, _ = _ok()
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match=r"backend 'triton' \(forced by EDGEPRUNE_BACKEND=triton\) cannot serve edge_mix: "):
        edge_mix(la.double(), clean.double())
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="EDGEPRUNE_BACKEND: expected one of auto, triton, cpp, reference, got 'bogus'"):
        edge_mix(la, clean)
