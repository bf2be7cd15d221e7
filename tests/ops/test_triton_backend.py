"""The Triton backend against the reference maths (ops/hard_concrete.py, ops/edge_mix.py):
outputs and every gradient, odd shapes, both ablations, node masks, training and
deterministic masks, fp32/bf16/fp16, the in-kernel Philox noise, and determinism.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is
set below, before anything imports the kernels); with one, on CUDA tensors. Shapes stay
tiny: the interpreter runs every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from edgeprune_fast.ops import (  # noqa: E402
    BackendUnavailable,
    HardConcreteParams,
    edge_mix,
    edge_mix_reference,
    expected_l0,
    hard_concrete,
    hard_concrete_reference,
    mix,
    mix_reference,
    use_backend,
)
from edgeprune_fast.ops.backends import triton as triton_backend  # noqa: E402

pytest.importorskip("triton")
pytestmark = [pytest.mark.cuda,  # the CUDA subset (bench/gpu_check.sh runs `-m cuda` on the GPU)
              # Triton's interpreter itself converts scalar loop bounds with a numpy call newer numpy deprecates
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

from tests.ops._edge_mix_cases import (  # noqa: E402
    assert_grad_into_agrees,
    base_runs,
    edge_mix_inputs,
    grad_into_runs,
    leaves,
    run_edge_mix,
    torch_low_precision,
    uniform_noise,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = HardConcreteParams()
TOL32 = dict(rtol=1e-5, atol=1e-5)


def _u(*shape):
    return uniform_noise(*shape, device=DEVICE)


def _inputs(R, W, N, D, *, corrupted, node, dtype=torch.float32):
    return edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=node, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- hard_concrete


@pytest.mark.parametrize("training", [True, False])
def test_hard_concrete_matches_reference(training):
    la = (torch.randn(3, 7) * 2).to(DEVICE)
    la[0, :2] = torch.tensor([9.0, -9.0])
    u, g = _u(3, 7), torch.randn(3, 7).to(DEVICE)
    la_t, la_r = leaves(la, la)
    with use_backend("triton"):
        z = hard_concrete(la_t, u=u, training=training)
    z.backward(g)
    z_ref = hard_concrete_reference(la_r, u, training=training)
    z_ref.backward(g)
    torch.testing.assert_close(z, z_ref, **TOL32)
    torch.testing.assert_close(la_t.grad, la_r.grad, **TOL32)
    assert (la_t.grad[0, :2] == 0).all()  # clamp active: no gradient


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("left,right", [(-1.0, 3.0), (-2.0, 2.0)], ids=["v=1", "v=0"])
def test_hard_concrete_gradient_at_the_clamp_edge(training, left, right):
    """At v = 0 or v = 1 exactly the gradient passes, as torch.clamp's autograd does.
    u = 0.5, log_alpha = 0 give s = 0.5 exactly, so v = 0.5*(right - left) + left exactly."""
    p = HardConcreteParams(left=left, right=right)
    edge = torch.tensor(0.5 * (right - left) + left, requires_grad=True)
    edge.clamp(0.0, 1.0).backward()
    assert edge.grad.item() == 1.0  # torch's convention, inclusive
    la = torch.zeros(4, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        z = hard_concrete(la, u=torch.full((4,), 0.5, device=DEVICE), training=training, params=p)
    z.sum().backward()
    assert (z == edge.detach().clamp(0, 1).item()).all()
    want = (right - left) * 0.25 / (p.beta if training else 1.0)
    torch.testing.assert_close(la.grad, torch.full_like(la, want), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- edge_mix, fp32

CASES = {  # R, W, N (tokens), D, corrupted, node masks, training
    "W5-D13-corrupt-node": (4, 5, 2, 13, True, True, True),
    "R1-W37-one-token-zero-ablation-node": (1, 37, 1, 13, False, True, True),
    "R70-reader-blocks-corrupt": (70, 5, 11, 13, True, False, True),
    "W37-deterministic-corrupt-node": (3, 37, 2, 13, True, True, False),
    "deterministic-zero-ablation": (6, 5, 1, 7, False, False, False),
    "M143-column-blocks-node": (5, 17, 11, 13, True, True, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_edge_mix_matches_reference(case):
    R, W, N, D, corrupted, node, training = CASES[case]
    la, ln, clean, corrupt, ue, un = _inputs(R, W, N, D, corrupted=corrupted, node=node)
    wx, wz = torch.randn(R, N, D).to(DEVICE), torch.randn(R, W).to(DEVICE)
    with use_backend("triton"):
        got = run_edge_mix(edge_mix, la, ln, clean, corrupt, ue, un, training, wx, wz)
    want = run_edge_mix(edge_mix_reference, la, ln, clean, corrupt, ue, un, training, wx, wz)
    for name, a, b in zip(("x", "z_eff", "grad log_alpha_edge", "grad log_alpha_node", "grad clean"), got, want):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, **TOL32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("corrupted", [True, False])
def test_mix_matches_reference(corrupted):
    R, W, N, D = 3, 5, 3, 13
    z = torch.rand(R, W).to(DEVICE)
    z[0, 0], z[1, 1] = 0.0, 1.0
    clean = torch.randn(W, N, D).to(DEVICE)
    corrupt = torch.randn(W, N, D).to(DEVICE) if corrupted else None
    g = torch.randn(R, N, D).to(DEVICE)
    zt, ct, zr, cr = leaves(z, clean, z, clean)
    with use_backend("triton"):
        x = mix(zt, ct, corrupt)
    x.backward(g)
    x_ref = mix_reference(zr, cr, corrupt)
    x_ref.backward(g)
    torch.testing.assert_close(x, x_ref, **TOL32)
    torch.testing.assert_close(zt.grad, zr.grad, **TOL32)
    torch.testing.assert_close(ct.grad, cr.grad, **TOL32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [1, 5])
def test_grad_into_adds_the_clean_gradient_in_place(dtype, R):
    """grad_into: the backward kernel adds dL/dclean into the given tensor and returns none."""
    tol = TOL32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with use_backend("triton"):
        runs = grad_into_runs(R, 17, 3, 13, corrupted=True, dtype=dtype, device=DEVICE)
    assert_grad_into_agrees(runs, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("corrupted", [True, False])
def test_base_is_added_to_every_reader(dtype, corrupted):
    """base: added in the float32 accumulator of every reader's x; no gradient changes."""
    tol = TOL32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with use_backend("triton"):
        runs = base_runs(5, 17, 3, 13, corrupted=corrupted, dtype=dtype, device=DEVICE)
    assert_grad_into_agrees(runs, tol)


@pytest.mark.parametrize("max_programs", [1, 2, None])
def test_mix_backward_persistent_grid(max_programs):
    """Fewer programs than column blocks: each accumulates its partial grad_z over several."""
    mix_backward = triton_backend.load_kernels().mix_backward
    R, W, M = 3, 5, 200  # 4 column blocks of 64
    z, g = torch.rand(R, W).to(DEVICE), torch.randn(R, M).to(DEVICE)
    clean, corrupt = torch.randn(W, M).to(DEVICE), torch.randn(W, M).to(DEVICE)
    gz, gc = mix_backward(g, z, clean, corrupt, max_programs=max_programs)
    torch.testing.assert_close(gz, g @ (clean - corrupt).T, **TOL32)
    torch.testing.assert_close(gc, z.T @ g, **TOL32)


# ---------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("corrupted", [True, False], ids=["corrupted", "zero-ablation"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_edge_mix_low_precision(dtype, corrupted):
    """FlashAttention's rule: error against an fp32 reference at most twice torch's own
    low-precision error (plus a hair for quantities torch happens to get exact)."""
    R, W, N, D = 4, 37, 3, 13
    la, ln, clean, corrupt, ue, un = _inputs(R, W, N, D, corrupted=corrupted, node=True, dtype=dtype)
    wx, wz = torch.randn(R, N, D).to(DEVICE), torch.randn(R, W).to(DEVICE)
    with use_backend("triton"):
        got = run_edge_mix(edge_mix, la, ln, clean, corrupt, ue, un, True, wx, wz)
    ref = run_edge_mix(edge_mix_reference, la, ln, clean.float(), corrupt if corrupt is None else corrupt.float(),
                        ue, un, True, wx, wz)
    low = torch_low_precision(la, ln, clean, corrupt, ue, un, wx, wz)
    assert got[0].dtype == dtype and got[4].dtype == dtype and got[1].dtype == torch.float32
    for name, a, r, t in zip(("x", "z_eff", "grad log_alpha_edge", "grad log_alpha_node", "grad clean"), got, ref, low):
        err = (a.float() - r).abs().max().item()
        err_torch = (t.float() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-5 * r.abs().max().item(), f"{name}: {err} vs torch's {err_torch}"


# ---------------------------------------------------------------- Philox noise


def test_seed_same_bits_and_different_seeds():
    R, W, N, D = 3, 5, 2, 13
    la, ln, clean, corrupt, _, _ = _inputs(R, W, N, D, corrupted=True, node=True)
    with use_backend("triton"):
        x1, z1 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=7)
        x2, z2 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=7)
        x3, z3 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=8)
        x4, z4 = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=2**62 + 7)  # 64-bit seeds use both halves
        # the fused kernel's masks are the hard-concrete kernel's: edges at 0.., nodes at R*W..
        z_edge = hard_concrete(la, seed=7)
        z_node = triton_backend.BACKEND.hard_concrete_forward(ln, None, 7, R * W, True, P)
    assert torch.equal(x1, x2) and torch.equal(z1, z2)
    assert not torch.equal(z1, z3) and not torch.equal(z1, z4)
    torch.testing.assert_close(z1, z_edge * z_node[None, :], rtol=0, atol=0)
    torch.testing.assert_close(x1, mix_reference(z1, clean, corrupt), **TOL32)


@pytest.mark.parametrize("training,seeded", [(True, True), (True, False), (False, False)])
def test_sampling_in_kernel_or_pre_pass_same_bits(training, seeded):
    """Masks sampled inside the mixing kernel or by the pre-pass: the same z_eff bits."""
    edge_mix_forward = triton_backend.load_kernels().edge_mix_forward
    R, W, M = 3, 37, 300  # 3 column blocks: every column program samples in the fused path
    la, ln, _, _, ue, un = _inputs(R, W, 1, 1, corrupted=False, node=True)
    clean, corrupt = torch.randn(W, M).to(DEVICE), torch.randn(W, M).to(DEVICE)
    u = (None, None) if seeded or not training else (ue, un)
    fused = edge_mix_forward(la, ln, clean, corrupt, *u, 5, training, P, fuse_sampling=True)
    pre = edge_mix_forward(la, ln, clean, corrupt, *u, 5, training, P, fuse_sampling=False)
    assert torch.equal(fused[1], pre[1])
    torch.testing.assert_close(fused[0], pre[0], rtol=0, atol=0)


def test_seed_gradient_recomputes_the_same_noise():
    """Backward redraws u from the seed: grad = dL/dz * (r-l)*s*(1-s)/beta with s read off
    the forward's z (where the clamp is inactive), 0 where it is active."""
    R, W, N, D = 4, 5, 2, 13
    la, _, clean, corrupt, _, _ = _inputs(R, W, N, D, corrupted=True, node=False)
    la = la.requires_grad_(True)
    wx = torch.randn(R, N, D).to(DEVICE)
    with use_backend("triton"):
        x, z = edge_mix(la, clean, corrupt, seed=123)
    (x * wx).sum().backward()
    zg = z.detach().clone().requires_grad_(True)
    (mix_reference(zg, clean, corrupt) * wx).sum().backward()
    s = (z.detach() - P.left) / (P.right - P.left)
    inside = (z > 0) & (z < 1)
    want = torch.where(inside, zg.grad * (P.right - P.left) * s * (1 - s) / P.beta, torch.zeros_like(s))
    torch.testing.assert_close(la.grad, want, rtol=1e-4, atol=1e-5)


def _mean_hard_concrete(log_alpha: float, n: int = 200_000) -> float:
    """E[z] by the midpoint rule over u in (0, 1), float64."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = P.eps + (1 - 2 * P.eps) * u
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / P.beta)
    return (s * (P.right - P.left) + P.left).clamp(0, 1).mean().item()


@pytest.mark.parametrize("log_alpha", [-1.0, 0.5, 2.0])
def test_seed_statistics(log_alpha):
    n = 8192
    la = torch.full((n,), log_alpha, device=DEVICE)
    with use_backend("triton"):
        z = hard_concrete(la, seed=11).double()
    mean, nonzero = _mean_hard_concrete(log_alpha), expected_l0(torch.tensor([log_alpha])).item()
    assert abs(z.mean().item() - mean) < 4.5 * 0.5 / math.sqrt(n)
    p = nonzero
    assert abs((z != 0).double().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    assert z.min() >= 0 and z.max() <= 1 and (z == 1).any() and (z == 0).any()


def test_mask_gradients_bitwise_deterministic():
    R, W, N, D = 5, 37, 4, 80  # 320 columns: 5 backward column blocks, more than the CPU's 4 programs
    la, ln, clean, corrupt, _, _ = _inputs(R, W, N, D, corrupted=True, node=True)
    wx, wz = torch.randn(R, N, D).to(DEVICE), torch.randn(R, W).to(DEVICE)

    def grads():
        a, b, c = leaves(la, ln, clean)
        with use_backend("triton"):
            x, z = edge_mix(a, c, corrupt, log_alpha_node=b, seed=3)
        ((x * wx).sum() + (z * wz).sum()).backward()
        return a.grad, b.grad, c.grad

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


# ---------------------------------------------------------------- builds for the H100

BUILD_H100 = r"""
import json, re, subprocess, sys, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from edgeprune_fast.ops.backends.triton import load_kernels
em, hc = load_kernels().edge_mix, load_kernels().hard_concrete

DATA = ("x_ptr", "clean_ptr", "corrupt_ptr", "grad_clean_ptr", "grad_x_ptr")
FLOATS = ("beta", "scale", "left", "eps")
PTXAS = get_ptxas(90).path  # the ptxas Triton itself uses for sm_90

def build(name, fn, data, consts, num_warps=4, num_stages=3):
    sig = {n: "constexpr" if n in consts else (data if n in DATA else "*fp32") if n.endswith("_ptr")
           else "fp32" if n in FLOATS else "i32" for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:  # ptxas -v: registers and spills
        f.write(k.asm["ptx"])
        f.flush()
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True)
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", out.stdout + out.stderr)]
    return {"kernel": name, "cubin_bytes": len(k.asm["cubin"]), "spill_bytes": sum(spills) if spills else None}

rows = []
for tr, us in ((True, True), (True, False), (False, False)):
    for fn in (hc._hard_concrete_fwd_kernel, hc._hard_concrete_bwd_kernel):
        rows.append(build(f"{fn.fn.__name__} training={tr} seed={us}", fn, "*fp32",
                          dict(TRAINING=tr, USE_SEED=us, BLOCK=1024)))
rows.append(build("masks", em._edge_mix_masks_kernel, "*fp32",
                  dict(HAS_NODE=True, TRAINING=True, USE_SEED=True, BLOCK_R=32, BLOCK_W=32)))
for dtype, data in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
    prec = em._dot_precision(dtype)
    # the forward as the model calls it (given z after the pre-pass, base) and fused sampling
    for R, M, given, corrupt, base in ((64, 10**6, True, False, True), (37, 100, False, True, False)):
        cfg = em._config("fwd", R, M, dtype)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        rows.append(build(f"fwd {data} R={R} given_z={given}", em._edge_mix_fwd_kernel, data, dict(
            GIVEN_Z=given, HAS_NODE=True, TRAINING=True, USE_SEED=True, HAS_CORRUPT=corrupt, HAS_BASE=base,
            DOT_PRECISION=prec, **cfg), nw, ns))
    # the backward: the model's calls (grad_into, no corrupt) at 1, 48 and 64 readers; reader blocks past 64
    for R, accumulate in ((1, True), (48, True), (64, False), (200, False)):
        cfg = em._config("bwd", R, 10**6, dtype)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        rows.append(build(f"bwd {data} R={R} accumulate={accumulate}", em._mix_bwd_kernel, data, dict(
            HAS_CORRUPT=not accumulate, ONE_R_BLOCK=R <= cfg["BLOCK_R"], DOT_PRECISION=prec, ACCUMULATE=accumulate,
            **cfg), nw, ns))
print(json.dumps(rows))
"""


def test_kernels_build_for_h100(tmp_path):
    """Every kernel, in the variants the launchers pick at GPT-2 and Llama-3.1-8B shapes and
    past 64 readers, compiles through Triton's whole CUDA pipeline to an sm_90 cubin (the
    bundled ptxas) and spills no registers (edgeprune_fast/kernels/edge_mix.py ``_config``): no GPU needed,
    so GPU-only compile errors and spilling tiles show up on CPU machines too."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # no CUDA backend in this triton installation
        pytest.skip(f"this triton installation cannot build for CUDA here ({type(exc).__name__}: {exc})")
    if not os.path.exists(ptxas):
        pytest.skip("this triton installation has no ptxas to build with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    import edgeprune_fast  # the child imports the package from where this process found it

    where = os.path.dirname(os.path.dirname(os.path.abspath(edgeprune_fast.__file__)))
    env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", BUILD_H100], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 19 and all(r["cubin_bytes"] > 0 for r in rows)
    assert [r for r in rows if r["spill_bytes"] != 0] == []  # 0, and ptxas did report it


# ---------------------------------------------------------------- availability


def test_float64_is_not_served():
    la = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    why = triton_backend.BACKEND.unavailable("edge_mix", [la, torch.zeros(3, 4, dtype=torch.float64, device=DEVICE)])
    assert len(why) == 1 and "float64" in why[0]
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="float64"):
        edge_mix(la, torch.zeros(3, 4, dtype=torch.float64, device=DEVICE), seed=0)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fresh = triton_backend.TritonBackend()  # kernels not loaded: it goes by the environment
    why = fresh.unavailable("mix", [torch.zeros(2, 2)])
    assert any("CUDA" in w and "TRITON_INTERPRET" in w for w in why)


def test_triton_not_installed(monkeypatch):
    real = triton_backend.importlib.util.find_spec
    monkeypatch.setattr(triton_backend.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    why = triton_backend.TritonBackend().unavailable("hard_concrete", [torch.zeros(2, device=DEVICE)])
    assert any("not installed" in w for w in why)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_automatic_choice_on_cuda_tensors_is_triton(monkeypatch):
    """On the GPU every op goes to the kernels by itself, also where the package runs from a
    checkout that was never installed (bench/gpu_check.sh)."""
    from edgeprune_fast.ops import backends

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    for op in backends.OPS:
        assert backends.choose(op, [torch.zeros(2, 2, device="cuda")]).name == "triton", backends.report(
            op, [torch.zeros(2, 2, device="cuda")])
