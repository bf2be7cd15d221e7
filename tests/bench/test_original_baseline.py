"""The benchmark's baseline (bench/original_baseline.py, the original algorithm) computes the
same function as EdgePrunedModel: with the same exact 0/1 masks (split embeddings) both give
the same logits, to fp32 rounding. The baseline's corrupted states come from its own
disentangled pass, ours from the plain HF forward, so this also checks that the two
agree on every writer."""

from __future__ import annotations

import pytest
import torch

from bench.original_baseline import OriginalGPT2
from edgeprune_fast.model import EdgePrunedModel
from tests.models._tiny import VOCAB, tiny_model

TOL = 1e-5


def _ids(seed: int, B: int = 3, S: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _pair():
    hf = tiny_model("gpt2")
    return EdgePrunedModel.from_hf(hf, split_embeds=True, ablation="corrupted"), OriginalGPT2(hf)


def test_same_graph():
    ours, base = _pair()
    assert base.writers == list(ours.graph.writer_names())
    assert base.W == ours.graph.n_writers
    # every edge of ours is an upstream (reader, writer slot) pair of the baseline, and vice versa
    n_valid = sum(int(base.valid(r).sum()) for r in base.readers)
    assert n_valid == base.n_edges == ours.graph.n_edges


@pytest.mark.parametrize("circuit", ["random", "all"])
def test_same_logits_as_edge_pruned_model(circuit):
    ours, base = _pair()
    ids, cids = _ids(0), _ids(1)
    g = torch.Generator().manual_seed(3)
    edges = [e for e in ours.graph.edges() if circuit == "all" or torch.rand(1, generator=g).item() < 0.5]
    ours.set_circuit(edges)
    masks = base.masks_from_edges([(e.writer, e.reader) for e in edges])
    with torch.no_grad():
        _, corrupt = base.forward(cids, base.all_ones())  # the baseline's own corrupted pass
        want, _ = base.forward(ids, masks, corrupt)
        got = ours(ids, cids).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        # the baseline's corrupted states are the same writers as our reference capture
        torch.testing.assert_close(corrupt, ours.reference(cids)[1], atol=TOL, rtol=0)
        hf_logits = ours.hf(ids).logits
        if circuit == "all":
            torch.testing.assert_close(want, hf_logits, atol=TOL, rtol=0)
        else:  # the circuit really changes the output, so the comparison above means something
            assert (want - hf_logits).abs().max() > 1e-2


def test_baseline_step_trains_the_masks():
    # the baseline's step runs end to end and moves every learned parameter (the Lagrangian
    # reaches every upstream log_alpha; the KL alone does not where a sample is clamped at 1)
    _, base = _pair()
    ids, cids = _ids(0), _ids(1)
    la = {r: torch.full((base.W,), 3.0, requires_grad=True) for r in base.readers}
    node = torch.full((base.W,), 3.0, requires_grad=True)
    lambdas = torch.ones(4, requires_grad=True)
    before = {r: v.detach().clone() for r, v in la.items()}
    opt = torch.optim.AdamW([*la.values(), node], lr=0.1, weight_decay=0.0)  # only gradients move them
    lam_opt = torch.optim.AdamW([lambdas], lr=0.1, weight_decay=0.0, maximize=True)
    loss = base.step(ids, cids, la, node, lambdas, target=0.5, optimizers=(opt, lam_opt))
    assert torch.isfinite(torch.tensor(loss))
    moved = [r for r in base.readers if not torch.equal(la[r].detach()[base.valid(r).bool()], before[r][base.valid(r).bool()])]
    assert moved == base.readers
    assert bool((lambdas.detach() != 1).all())
