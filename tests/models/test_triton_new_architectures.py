"""The newer families with every op forced to the Triton kernels (``EDGEPRUNE_BACKEND=triton``;
without a GPU they run in Triton's interpreter on CPU tensors, TRITON_INTERPRET=1 set by
tests/conftest.py): float32 random circuits against the slow reference under corrupted and
zero ablation (``mix``), and a sampled training step's logits and mask gradients against the
plain-PyTorch reference backend (``edge_mix``, hard-concrete masks; the same explicit noise).
Tiny shapes: the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _slow_reference import slow_forward
from _tiny import NEW_ARCHS, VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.ops import use_backend

pytest.importorskip("triton")
pytestmark = [pytest.mark.cuda,  # in the GPU check's -m cuda subset too (on the GPU there)
              # Triton's interpreter converts scalar loop bounds with a call newer numpy deprecates
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def _ids(seed):
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))  # 7 > window 4


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_triton_random_circuits_and_gradients(arch, monkeypatch, one_thread):
    model = tiny_model(arch)
    ids, cids = _ids(0), _ids(1)
    everything = None
    with torch.no_grad():
        for ablation in ("corrupted", "zero"):
            pruned = EdgePrunedModel.from_hf(model, ablation=ablation)
            everything = everything or {(e.writer, e.reader) for e in pruned.graph.edges()}
            g = torch.Generator().manual_seed(3)
            edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
            ablated = slow_forward(model, cids, everything)[1] if ablation == "corrupted" else None
            want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated)
            pruned.set_circuit(edges)
            with monkeypatch.context() as m:
                m.setenv("EDGEPRUNE_BACKEND", "triton")
                got = pruned.to(DEVICE)(ids.to(DEVICE), None if ablated is None else cids.to(DEVICE)).logits
            torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0)

    _assert_sampled_step_matches_reference_backend(model, ids, cids)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_triton_post_norm_reader_mode(arch, monkeypatch, one_thread):
    """post_norm="reader" (MIB's graph for post-norms): a random circuit under corrupted ablation
    against the slow reference, and a sampled step's gradients against the reference backend."""
    model = tiny_model(arch)
    ids, cids = _ids(0), _ids(1)
    with torch.no_grad():
        pruned = EdgePrunedModel.from_hf(model, post_norm="reader")
        everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
        g = torch.Generator().manual_seed(3)
        edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.7]
        ablated = slow_forward(model, cids, everything, post_norm="reader")[1]
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated, post_norm="reader")
        pruned.set_circuit(edges)
        with monkeypatch.context() as m:
            m.setenv("EDGEPRUNE_BACKEND", "triton")
            got = pruned.to(DEVICE)(ids.to(DEVICE), cids.to(DEVICE)).logits
        torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0)
    _assert_sampled_step_matches_reference_backend(model, ids, cids, post_norm="reader")


def _assert_sampled_step_matches_reference_backend(model, ids, cids, **kwargs) -> None:
    """One sampled training step (node masks on) on the Triton and the reference backend: the
    same logits and mask gradients, every gradient non-zero."""
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(4)
        pruned = EdgePrunedModel.from_hf(model, init=1.0, init_std=1.0, **kwargs).to(DEVICE).train()
        full, _ = pruned.reference(ids.to(DEVICE))
        torch.manual_seed(5)  # node masks: explicit uniforms drawn by torch, the same in both runs
        with use_backend(backend):
            out = pruned(ids.to(DEVICE), cids.to(DEVICE), training=True)
            kl = F.kl_div(out.logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean")
            (kl + out.edge_sparsity).backward()
        results.append((out.logits.detach().cpu(), [p.grad.cpu() for p in pruned.masks.parameters()]))
    (logits_t, grads_t), (logits_r, grads_r) = results
    torch.testing.assert_close(logits_t, logits_r, atol=TOL, rtol=0)
    assert len(grads_t) == len(grads_r) > 1
    for gt, gr in zip(grads_t, grads_r):
        assert gr.abs().sum() > 0
        torch.testing.assert_close(gt, gr, atol=1e-5, rtol=1e-4)
