"""The C++ backend (edgeprune_fast._C, csrc/) against the reference maths
(ops/hard_concrete.py, ops/edge_mix.py): outputs and every gradient, odd shapes (W not a
power of two, D prime, one token, one reader, several column tiles and more tiles than
partial-sum chunks), both ablations, node masks, training and deterministic masks, each
dtype, bitwise determinism, the extension's own argument checks, and the reasons a forced
backend gives when it cannot serve a call.

Skipped, with the reason, when the extension is not built (`make setup` or
`pip install --no-build-isolation -e .` builds it; CI does).
"""

import pytest
import torch

from edgeprune_fast import _native
from edgeprune_fast.ops import (
    BackendUnavailable,
    HardConcreteParams,
    backends,
    edge_mix,
    edge_mix_reference,
    hard_concrete,
    hard_concrete_reference,
    mix,
    mix_reference,
    use_backend,
)
from edgeprune_fast.ops.backends import cpp as cpp_backend

if _native.load() is None:
    pytest.skip(f"the C++ extension is not available: {_native.load_error()}", allow_module_level=True)

from tests.ops._edge_mix_cases import (
    assert_grad_into_agrees,
    base_runs,
    edge_mix_inputs,
    grad_into_runs,
    leaves,
    run_edge_mix,
    torch_low_precision,
    uniform_noise,
)

_C = _native.load()
P = HardConcreteParams()
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
NAMES = ("x", "z_eff", "grad log_alpha_edge", "grad log_alpha_node", "grad clean")


def _cpp(fn):
    def run(*args, **kwargs):
        with use_backend("cpp"):
            return fn(*args, **kwargs)
    return run


def test_automatic_choice_on_cpu_is_cpp():
    assert backends.choose("edge_mix", [torch.zeros(2, 2)]).name == "cpp"
    assert backends.choose("hard_concrete", [torch.zeros(2)]).name == "cpp"
    assert _C.built_with_torch.split("+")[0] == torch.__version__.split("+")[0]


# ---------------------------------------------------------------- hard_concrete


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "deterministic"])
def test_hard_concrete_matches_reference(training, dtype):
    la = (torch.randn(3, 7) * 2).to(dtype)
    la[0, :2] = torch.tensor([9.0, -9.0])
    u, g = uniform_noise(3, 7, dtype=dtype), torch.randn(3, 7)
    la_c, la_r = leaves(la, la)
    with use_backend("cpp"):
        z = hard_concrete(la_c, u=u, training=training)
    z.backward(g.to(z.dtype))
    z_ref = hard_concrete_reference(la_r, u, training=training)
    z_ref.backward(g.to(z_ref.dtype))
    assert z.dtype == z_ref.dtype
    torch.testing.assert_close(z, z_ref, **TOL[dtype])
    torch.testing.assert_close(la_c.grad, la_r.grad, **TOL[dtype])
    assert (la_c.grad[0, :2] == 0).all()  # clamp active: no gradient


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("left,right", [(-1.0, 3.0), (-2.0, 2.0)], ids=["v=1", "v=0"])
def test_hard_concrete_gradient_at_the_clamp_edge(training, left, right):
    """At v = 0 or 1 exactly the gradient passes (torch.clamp's convention): u = 0.5 and
    log_alpha = 0 give s = 0.5 exactly, so v = 0.5*(right - left) + left exactly."""
    p = HardConcreteParams(left=left, right=right)
    la = torch.zeros(4, requires_grad=True)
    with use_backend("cpp"):
        z = hard_concrete(la, u=torch.full((4,), 0.5), training=training, params=p)
    z.sum().backward()
    assert (z == min(max(0.5 * (right - left) + left, 0.0), 1.0)).all()
    want = (right - left) * 0.25 / (p.beta if training else 1.0)
    torch.testing.assert_close(la.grad, torch.full_like(la, want), rtol=1e-6, atol=0)


def test_seed_gives_the_reference_backends_bits():
    """No in-kernel generator: ops/ draws u from the seed on the CPU for both backends, so
    the masks agree to rounding (libm's exp/log against torch's vectorised ones)."""
    la, ln, clean, corrupt, _, _ = edge_mix_inputs(4, 5, 2, 13, corrupted=True, node=True)
    with use_backend("cpp"):
        x1, z1 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=7)
        x2, z2 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=8)
        h = hard_concrete(la, seed=7)
    with use_backend("reference"):
        xr, zr = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=7)
        hr = hard_concrete(la, seed=7)
    assert not torch.equal(z1, z2)
    for a, b in ((z1, zr), (h, hr), (x1, xr)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ---------------------------------------------------------------- edge_mix and mix, fp32 and fp64

CASES = {  # R, W, N (tokens), D, corrupted, node masks, training
    "W5-D13-corrupt-node": (4, 5, 2, 13, True, True, True),
    "R1-W37-one-token-zero-ablation-node": (1, 37, 1, 13, False, True, True),
    "W37-deterministic-corrupt-node": (3, 37, 2, 13, True, True, False),
    "deterministic-zero-ablation": (6, 5, 1, 7, False, False, False),
    "W3-two-tiles-corrupt": (5, 3, 41, 127, True, False, True),  # M = 5207 > 4096 columns a tile
    "W300-33-tiles-corrupt-node": (3, 300, 131, 223, True, True, True),  # 33 tiles of 896: > 32 chunks
    "W300-33-tiles-zero-ablation": (2, 300, 131, 223, False, False, True),
}


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_edge_mix_matches_reference(case, dtype):
    """fp64: equal to rounding. fp32: the error against the fp64 reference at most twice the
    fp32 reference's own (plus a hair), since long fp32 sums differ with summation order."""
    R, W, N, D, corrupted, node, training = CASES[case]
    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=node, dtype=dtype,
                                             mask_dtype=dtype)
    wx, wz = torch.randn(R, N, D, dtype=dtype), torch.randn(R, W, dtype=dtype)
    got = run_edge_mix(_cpp(edge_mix), la, ln, clean, corrupt, ue, un, training, wx, wz)
    want = run_edge_mix(edge_mix_reference, la, ln, clean, corrupt, ue, un, training, wx, wz)
    exact = run_edge_mix(edge_mix_reference, *_f64(la, ln, clean, corrupt, ue, un), training, *_f64(wx, wz))
    for name, a, b, e in zip(NAMES, got, want, exact):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
        else:
            err, err_ref = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            assert err <= 2 * err_ref + 1e-6 * e.abs().max().item(), f"{name}: {err} vs the reference's {err_ref}"


def test_gradcheck_float64():
    """torch.autograd.gradcheck through the C++ forward and backward, masks and writers."""
    la, ln, clean, corrupt, ue, un = edge_mix_inputs(3, 5, 2, 7, corrupted=True, node=True, dtype=torch.float64,
                                             mask_dtype=torch.float64)
    la = la.clamp(-2, 2)  # keep every mask off the clamp's kinks, where finite differences break

    def f(la_, ln_, clean_):
        with use_backend("cpp"):
            return edge_mix(la_, clean_, corrupt, log_alpha_node=ln_, u_edge=ue, u_node=un)

    assert torch.autograd.gradcheck(f, tuple(leaves(la, ln, clean)), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("corrupted", [True, False], ids=["corrupted", "zero-ablation"])
def test_mix_matches_reference(corrupted, dtype):
    R, W, N, D = 3, 5, 3, 13
    z = torch.rand(R, W, dtype=dtype)
    z[0, 0], z[1, 1] = 0.0, 1.0
    clean = torch.randn(W, N, D, dtype=dtype)
    corrupt = torch.randn(W, N, D, dtype=dtype) if corrupted else None
    g = torch.randn(R, N, D, dtype=dtype)
    zc, cc, zr, cr = leaves(z, clean, z, clean)
    with use_backend("cpp"):
        x = mix(zc, cc, corrupt)
    x.backward(g)
    x_ref = mix_reference(zr, cr, corrupt)
    x_ref.backward(g)
    for a, b in ((x, x_ref), (zc.grad, zr.grad), (cc.grad, cr.grad)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_zero_ablation_with_all_masks_one_is_the_sum_of_writers():
    W, N, D = 7, 3, 11
    clean = torch.randn(W, N, D)
    with use_backend("cpp"):
        x = mix(torch.ones(2, W), clean)
        x0 = mix(torch.zeros(2, W), clean)
    torch.testing.assert_close(x, clean.sum(0).expand(2, N, D), rtol=1e-6, atol=1e-6)
    assert (x0 == 0).all()


# ---------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("shape", [(4, 37, 3, 13), (3, 300, 131, 223)], ids=["one-tile", "33-tiles"])
@pytest.mark.parametrize("corrupted", [True, False], ids=["corrupted", "zero-ablation"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_edge_mix_low_precision(dtype, corrupted, shape):
    """FlashAttention's rule: error against an fp32 reference at most twice torch's own
    low-precision error (plus a hair for quantities torch happens to get exact)."""
    R, W, N, D = shape
    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=True, dtype=dtype)
    wx, wz = torch.randn(R, N, D), torch.randn(R, W)
    got = run_edge_mix(_cpp(edge_mix), la, ln, clean, corrupt, ue, un, True, wx, wz)
    ref = run_edge_mix(edge_mix_reference, la, ln, clean.float(), corrupt if corrupt is None else corrupt.float(),
                        ue, un, True, wx, wz)
    low = torch_low_precision(la, ln, clean, corrupt, ue, un, wx, wz)
    assert got[0].dtype == dtype and got[4].dtype == dtype and got[1].dtype == torch.float32
    for name, a, r, t in zip(NAMES, got, ref, low):
        err = (a.float() - r).abs().max().item()
        err_torch = (t.float() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-5 * r.abs().max().item(), f"{name}: {err} vs torch's {err_torch}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_matches_reference_in_its_dtype(dtype):
    """The reference on low-precision writers (fp32 arithmetic, one rounding at the end)."""
    R, W, N, D = 5, 11, 3, 17
    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=True, node=True, dtype=dtype)
    wx, wz = torch.randn(R, N, D), torch.randn(R, W)
    got = run_edge_mix(_cpp(edge_mix), la, ln, clean, corrupt, ue, un, True, wx, wz)
    want = run_edge_mix(edge_mix_reference, la, ln, clean, corrupt, ue, un, True, wx, wz)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("case", ["W5-D13-corrupt-node", "W300-33-tiles-corrupt-node"])
def test_bitwise_deterministic_across_calls_and_thread_counts(case):
    R, W, N, D, corrupted, node, _ = CASES[case]
    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=node)
    wx, wz = torch.randn(R, N, D), torch.randn(R, W)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            runs.append(run_edge_mix(_cpp(edge_mix), la, ln, clean, corrupt, ue, un, True, wx, wz))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- the extension's own checks


def test_extension_checks_name_the_argument():
    la, clean, corrupt = torch.randn(3, 5), torch.randn(5, 8), torch.randn(5, 8)
    u = uniform_noise(3, 5)
    args = dict(training=True, beta=P.beta, left=P.left, right=P.right)
    with pytest.raises(ValueError, match=r"corrupt: expected the shape of clean \[5, 8\], got \[5, 7\]"):
        _C.edge_mix_forward(la, None, clean, torch.randn(5, 7), u, None, **args)
    with pytest.raises(ValueError, match="clean: expected size 5 in dimension 0"):
        _C.edge_mix_forward(la, None, torch.randn(4, 8), None, u, None, **args)
    with pytest.raises(ValueError, match="u_edge: expected uniforms of shape .* got None"):
        _C.edge_mix_forward(la, None, clean, corrupt, None, None, **args)
    with pytest.raises(ValueError, match="u_node: expected the shape of log_alpha_node"):
        _C.edge_mix_forward(la, torch.randn(5), clean, corrupt, u, uniform_noise(4), **args)
    with pytest.raises(ValueError, match="clean: expected float32, float64, bfloat16 or float16"):
        _C.mix_forward(torch.rand(3, 5), torch.zeros(5, 8, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="grad_x: expected the dtype of clean"):
        _C.mix_backward(torch.randn(3, 8, dtype=torch.float64), torch.rand(3, 5), clean, None)
    with pytest.raises(ValueError, match="clean: expected a contiguous tensor"):
        _C.mix_forward(torch.rand(3, 5), torch.randn(8, 5).t(), None)
    with pytest.raises(ValueError, match="grad_z: expected the shape of log_alpha"):
        _C.hard_concrete_backward(torch.randn(4), torch.randn(5), None, False, P.beta, P.left, P.right)


# ---------------------------------------------------------------- availability


def test_not_built_lists_why_and_how(monkeypatch):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", "edgeprune_fast._C is not built (test); build it with pip install ...")
    monkeypatch.setattr(_native, "_tried", True)
    la, clean = torch.randn(2, 3), torch.randn(3, 4)
    assert backends.choose("edge_mix", [la, clean]).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    with pytest.raises(BackendUnavailable, match=r"'cpp' \(forced by EDGEPRUNE_BACKEND=cpp\) cannot serve "
                                                 r"edge_mix: .*not built.*pip install"):
        edge_mix(la, clean, seed=0)


def test_forced_on_what_it_cannot_serve_lists_every_reason(monkeypatch):
    why = cpp_backend.BACKEND.unavailable("mix", [torch.zeros(2, 2, device="meta"), torch.zeros(2, dtype=torch.int64)])
    assert any("tensors on meta" in w for w in why) and any("int64" in w for w in why)
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    with pytest.raises(BackendUnavailable, match="cpp.*cannot serve mix: tensors on meta"):
        backends.choose("mix", [torch.zeros(2, 2, device="meta")])


def test_seed_is_refused_by_the_kernels():
    with pytest.raises(RuntimeError, match="supports_seed=False"):
        cpp_backend.BACKEND.hard_concrete_forward(torch.zeros(2), None, 3, 0, True, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("R", [1, 4, 70])
@pytest.mark.parametrize("corrupted", [True, False])
def test_grad_into_adds_the_clean_gradient_in_place(dtype, R, corrupted):
    """grad_into: backward adds dL/dclean into the given tensor (one reader: the row-scaling
    path; several: the matrix product; 70: past a tile of readers) and returns none."""
    tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
    with use_backend("cpp"):
        runs = grad_into_runs(R, 37, 11, 13, corrupted=corrupted, dtype=dtype)
    assert_grad_into_agrees(runs, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("R", [1, 4, 70])
@pytest.mark.parametrize("corrupted", [True, False])
def test_base_is_added_to_every_reader(dtype, R, corrupted):
    """base: added to every reader's x inside the tiles (with and without the corrupted
    column sums it joins), rounded once; no gradient changes."""
    tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
    with use_backend("cpp"):
        runs = base_runs(R, 37, 11, 13, corrupted=corrupted, dtype=dtype)
    assert_grad_into_agrees(runs, tol)


def test_base_is_checked_by_the_extension():
    z, clean = torch.rand(2, 3), torch.randn(3, 20)
    with pytest.raises(ValueError, match="base: expected 20 elements"):
        _C.mix_forward(z, clean, None, torch.zeros(21))
    with pytest.raises(ValueError, match="base: expected dtype Double"):
        _C.mix_forward(z.double(), clean.double(), None, torch.zeros(20))


def test_grad_into_is_checked():
    la, clean = torch.zeros(2, 3), torch.zeros(3, 4, 5)
    for bad in (torch.zeros(3, 4, 6), torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 5, 4).transpose(1, 2)):
        with pytest.raises(ValueError, match="grad_into: expected a contiguous tensor of clean's shape"):
            edge_mix(la, clean, grad_into=bad)
        with pytest.raises(ValueError, match="grad_into"):
            mix(la, clean, grad_into=bad)
    with pytest.raises(ValueError, match="grad_clean_out: expected the shape of clean"):
        _C.mix_backward(torch.zeros(2, 20), la, clean.view(3, 20), None, torch.zeros(3, 21))
