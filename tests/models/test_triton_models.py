"""Model level through the Triton kernels: a GPT-2 and a Llama (grouped-query attention)
EdgePrunedModel whose edge_mix runs on the Triton backend, against the HF model, the slow
reference (tests/models/_slow_reference.py) and the same model on the plain-PyTorch
reference backend, in float32 and in bfloat16 / float16.

On a CUDA machine the models and kernels run on the GPU (``-m cuda`` selects these with
the kernel tests, bench/gpu_check.sh runs them); elsewhere on the CPU under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton).
The training noise is explicit uniforms from torch's generator (node masks on), so both
backends see the same samples and their outputs and gradients must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _slow_reference import slow_forward
from _tiny import VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.ops import use_backend

pytest.importorskip("triton")
pytestmark = [pytest.mark.cuda,
              # Triton's interpreter converts scalar loop bounds with a call newer numpy deprecates
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU attention and GEMMs sum in other orders than HF's
ARCHS = ("gpt2", "llama")


def _ids(seed: int, B: int = 2, S: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _on_device(model):
    return copy.deepcopy(model).to(DEVICE)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_and_random_circuits_equal_hf_and_slow_reference(arch):
    """Every edge kept: the HF logits; a random circuit with corrupted ablation: the slow
    reference's (computed on the CPU from the HF model's own modules)."""
    model = tiny_model(arch)
    ids, cids = _ids(0), _ids(1)
    pruned = EdgePrunedModel.from_hf(_on_device(model), ablation="corrupted")
    g = torch.Generator().manual_seed(7)
    edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
    everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
    with torch.no_grad():
        ablated = slow_forward(model, cids, everything)[1]
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated)
        hf = model(ids).logits
        with use_backend("triton"):
            pruned.set_circuit(pruned.graph.edges())
            full = pruned(ids.to(DEVICE), cids.to(DEVICE)).logits
            pruned.set_circuit(edges)
            got = pruned(ids.to(DEVICE), cids.to(DEVICE)).logits
    torch.testing.assert_close(full.cpu(), hf, atol=TOL, rtol=0)
    torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0)
    assert (want - hf).abs().max() > 1e-2  # the circuit really changes the output


def _step(model, backend: str, ids, cids, seed: int = 3):
    """One training forward + KL + sparsity backward on ``backend``: (logits, [mask grads])."""
    torch.manual_seed(seed)  # the same log_alphas and uniforms for every backend
    pruned = EdgePrunedModel.from_hf(model, init=0.5, init_std=0.5, ablation="corrupted").train()
    ids, cids = ids.to(DEVICE), cids.to(DEVICE)
    with use_backend(backend):
        full, _ = pruned.reference(ids)
        corrupted = pruned.reference(cids)[1]
        out = pruned(ids, corrupted_writers=corrupted, training=True)
        kl = F.kl_div(out.logits.float().log_softmax(-1), full.float().log_softmax(-1), log_target=True,
                      reduction="batchmean")
        (kl + out.edge_sparsity + out.node_sparsity).backward()
    params = pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters()
    return out.logits.detach().float().cpu(), [p.grad.cpu() for p in params]


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_matches_reference_backend_fp32(arch):
    """Sampled masks, forward and every mask gradient: Triton equals the reference backend."""
    model = tiny_model(arch)
    ids, cids = _ids(0), _ids(1)
    logits_t, grads_t = _step(_on_device(model), "triton", ids, cids)
    logits_r, grads_r = _step(_on_device(model), "reference", ids, cids)
    torch.testing.assert_close(logits_t, logits_r, atol=TOL, rtol=0)
    assert len(grads_t) == len(grads_r) and all(g.abs().sum() > 0 for g in grads_r)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_low_precision(arch, dtype):
    """16-bit models: the Triton run is as close to the float32 run as the reference backend's
    run in that dtype: logits within twice its largest error, each mask gradient within twice
    its error norm plus 1 % of the gradient's norm (both runs share the HF layers' rounding,
    which dominates; a gradient's error moves by a factor of a few between two such runs)."""
    ids, cids = _ids(0), _ids(1)
    logits32, grads32 = _step(_on_device(tiny_model(arch)), "reference", ids, cids)
    logits, grads = _step(_on_device(tiny_model(arch, dtype=dtype)), "triton", ids, cids)
    logits_ref, grads_ref = _step(_on_device(tiny_model(arch, dtype=dtype)), "reference", ids, cids)
    err, err_ref = (logits - logits32).abs().max().item(), (logits_ref - logits32).abs().max().item()
    assert 0 < err <= 2 * err_ref + 1e-3 * logits32.abs().max().item(), (err, err_ref)  # > 0: it ran in 16 bits
    for i, (g, g32, g_ref) in enumerate(zip(grads, grads32, grads_ref)):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), i
        err, err_ref = (g - g32).norm().item(), (g_ref - g32).norm().item()
        assert err <= 2 * err_ref + 0.01 * g32.norm().item(), f"mask gradient {i}: {err} vs the reference's {err_ref}"
