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


def test_node_masks_mixed_at_the_write_as_ours_fold_them_into_the_edges():
    # fractional deterministic masks (eval): ours multiplies z_node into z_edge at each read,
    # the baseline mixes z_node * y + (1 - z_node) * y~ at each write, as the original code
    # does; the reader inputs are the same (module docstring), so the logits must be too
    hf = tiny_model("gpt2")
    ours = EdgePrunedModel.from_hf(hf, split_embeds=True, node_masks=True, ablation="corrupted").eval()
    base = OriginalGPT2(hf)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.masks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)  # sigmoid(log_alpha) spread over (0, 1)

    def det(la):  # the deterministic hard-concrete mask
        P = ours.masks.params
        return (torch.sigmoid(la) * (P.right - P.left) + P.left).clamp(0, 1)

    masks = {}
    for grp, la in zip(ours.graph.groups, ours.masks.edge_log_alpha):
        for reader, row in zip(grp.readers, det(la.detach())):
            masks[reader] = torch.cat([row, row.new_zeros(base.W - row.numel())])
    node = det(ours.masks.node_log_alpha.detach())
    assert int(((node > 0) & (node < 1)).sum()) >= node.numel() // 2  # mostly fractional
    ids, cids = _ids(0), _ids(1)
    with torch.no_grad():
        _, corrupt = base.forward(cids, base.all_ones())
        want, _ = base.forward(ids, masks, corrupt, node)
        folded, _ = base.forward(ids, {r: m * node for r, m in masks.items()}, corrupt)
        got = ours(ids, cids).logits
        without_nodes, _ = base.forward(ids, masks, corrupt)
    assert (without_nodes - want).abs().max() > 1e-2  # the node masks matter here
    torch.testing.assert_close(want, folded, atol=TOL, rtol=0)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_bfloat16_model_runs_in_bfloat16_close_to_float32():
    """A bf16 model (the GPU benchmark's setting): float32 masks are cast where they meet the
    states, which stay bf16; the logits are as close to the float32 baseline's as the HF
    model's own bf16 logits are to its float32 ones."""
    ids, cids = _ids(0), _ids(1)
    base32, base16 = OriginalGPT2(tiny_model("gpt2")), OriginalGPT2(tiny_model("gpt2", dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(3)
    masks = {r: (torch.rand(base32.W, generator=g) < 0.5).float() for r in base32.readers}
    with torch.no_grad():
        want, _ = base32.forward(ids, masks, base32.forward(cids, base32.all_ones())[1])
        _, corrupt16 = base16.forward(cids, base16.all_ones())
        got, states = base16.forward(ids, masks, corrupt16)
        hf_err = (base16.hf(ids).logits.float() - base32.hf(ids).logits).abs().max()
    assert corrupt16.dtype == states.dtype == got.dtype == torch.bfloat16
    assert 0 < (got.float() - want).abs().max() <= 3 * hf_err + 1e-3
