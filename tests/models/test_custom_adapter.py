"""The adapter mechanism with a non-HF model: the shipped tracr `reverse` model (no norms,
bidirectional attention, its own reference forward) through the package's registered
``tracr_adapter``, with no set-up beyond ``EdgePrunedModel.from_hf``."""

from __future__ import annotations

import pytest
import torch

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.models import adapter_for, families, supported_hf_architectures
from edgeprune_fast.models.tracr import tracr_adapter
from edgeprune_fast.tracr import TRACR_DATA_DIR, load_examples, load_ground_truth, load_tracr


def test_tracr_adapter_is_registered():
    model = load_tracr(TRACR_DATA_DIR, "reverse")
    assert families()["tracr"].classes == ("TracrTransformer",)
    assert "TracrTransformer" not in supported_hf_architectures()  # not offered for HF folders
    a = adapter_for(model)
    assert a.architecture == "TracrTransformer" and not a.causal and a.reference_fn is not None
    assert a.layers[2].W_Q.data_ptr() == model.blocks[2].attn.W_Q.data_ptr()  # views, not copies
    assert tracr_adapter(model).n_layers == model.config.n_layers


@pytest.mark.parametrize("split", [False, True])
def test_tracr_through_an_adapter(split):
    model = load_tracr(TRACR_DATA_DIR, "reverse")
    truth = load_ground_truth(TRACR_DATA_DIR, "reverse")
    ids = next(iter(load_examples(TRACR_DATA_DIR, "reverse").values())).input_ids[:6]
    pruned = EdgePrunedModel.from_hf(model, ablation="zero", split_embeds=split)
    assert pruned.graph.n_edges == (truth.n_edges_full_split_embeds if split else truth.n_edges_full)
    circuit = truth.edges_split_embeds if split else truth.edges
    with torch.no_grad():
        full, writers = pruned.reference(ids)
        torch.testing.assert_close(full, model(ids), atol=1e-6, rtol=0)
        torch.testing.assert_close(writers.sum(0) @ model.unembed.W_U, full, atol=1e-5, rtol=0)
        pruned.set_circuit(pruned.graph.edges())
        torch.testing.assert_close(pruned(ids).logits, model(ids), atol=1e-5, rtol=0)
        pruned.set_circuit(circuit)
        want = model.forward_with_circuit(ids, circuit, split_embeds=split)
        torch.testing.assert_close(pruned(ids).logits, want, atol=1e-5, rtol=0)
