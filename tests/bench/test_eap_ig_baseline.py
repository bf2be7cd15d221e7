"""bench/eap_ig_baseline.py (EAP-IG's formulation, op for op) gives our scores: the two
formulations agree on tiny float64 GPT-2 and Llama (GQA, ungrouped as TransformerLens does),
up to EAP-IG's extra 1 / batch size; so the bench compares the same computation."""

import pytest
import torch

from bench.eap_ig_baseline import EapIgBaseline
from edgeprune_fast.attribution import attribute
from edgeprune_fast.formats import eap_matrix_position, edge_to_eap
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.base import TaskBatch
from tests.models._tiny import VOCAB, tiny_model


class Toy:
    name, contrast_key = "toy", "other"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_baseline_equals_ours(arch, method):
    hf = tiny_model(arch, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    B, S = 3, 6
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    cids = ids.clone()
    cids[:, 2] = torch.randint(3, VOCAB, (B,), generator=g)
    labels, other = torch.randint(3, VOCAB, (B,), generator=g), torch.randint(3, VOCAB, (B,), generator=g)
    target = torch.zeros(B, S, dtype=torch.bool)
    target[:, -1] = True
    batch = TaskBatch(ids, cids, None, target, None, labels, {"other": other})
    model = EdgePrunedModel.from_hf(hf, kv_per_query_head=True)
    ours = attribute(model, Toy(), [batch], method=method, metric="logit-diff", ig_steps=3, progress=False)
    base = EapIgBaseline(hf)
    theirs = base.scores(ids, cids, labels, other, method=method, steps=3).flatten()
    graph = model.graph
    pos = [eap_matrix_position(base.L, base.H, edge_to_eap(graph, e)[0]) for e in graph.edges()]
    assert len(set(pos)) == graph.n_edges
    # HF's RMSNorm modules compute in float32 (the baseline calls them on [B, S, H, D]): ~1e-7 for Llama
    torch.testing.assert_close(theirs[pos] * B, ours, atol=1e-9 if arch == "gpt2" else 1e-6, rtol=0)
    assert float(ours.abs().max()) > 1e-3
