"""The adapter mechanism with a non-HF model: the shipped tracr `reverse` model (no norms,
bidirectional attention, its own reference forward), as a template for tracr.py's adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune_fast.adapters import ADAPTERS, Adapter, LayerSpec
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tracr import TRACR_DATA_DIR, load_examples, load_ground_truth, load_tracr


def tracr_adapter(model) -> Adapter:
    cfg = model.config
    layers = tuple(LayerSpec(attn_norm=nn.Identity(), mlp_norm=nn.Identity(), W_Q=b.attn.W_Q, b_Q=b.attn.b_Q,
                             W_K=b.attn.W_K, b_K=b.attn.b_K, W_V=b.attn.W_V, b_V=b.attn.b_V, W_O=b.attn.W_O,
                             b_O=b.attn.b_O, mlp=b.mlp, scale=cfg.attn_scale, o_proj=None) for b in model.blocks)

    def reference(ids, attention_mask, position_ids, graph):
        out, y = model.run_with_writers(ids, graph.config.split_embeds)
        return out, torch.stack([y[w] for w in graph.writer_names()])

    return Adapter(architecture="TracrTransformer", model=model, layers=layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx,
                   embed_tokens=lambda ids: model.embed.W_tok[ids], embed_positions=lambda pos: model.embed.W_pos[pos],
                   rotary=None, apply_rotary=None, final_norm=nn.Identity(), unembed=model.unembed,
                   full_forward=lambda ids, mask, pos: model(ids), causal=False, reference_fn=reference)


@pytest.mark.parametrize("split", [False, True])
def test_tracr_through_an_adapter(monkeypatch, split):
    monkeypatch.setitem(ADAPTERS, "TracrTransformer", tracr_adapter)
    model = load_tracr(TRACR_DATA_DIR, "reverse")
    truth = load_ground_truth(TRACR_DATA_DIR, "reverse")
    ids = next(iter(load_examples(TRACR_DATA_DIR, "reverse").values())).input_ids[:6]
    pruned = EdgePrunedModel.from_hf(model, ablation="zero", split_embeds=split)
    assert pruned.graph.n_edges == (truth.n_edges_full_split_embeds if split else truth.n_edges_full)
    circuit = truth.edges_split_embeds if split else truth.edges
    with torch.no_grad():
        pruned.set_circuit(pruned.graph.edges())
        torch.testing.assert_close(pruned(ids).logits, model(ids), atol=1e-5, rtol=0)
        pruned.set_circuit(circuit)
        want = model.forward_with_circuit(ids, circuit, split_embeds=split)
        torch.testing.assert_close(pruned(ids).logits, want, atol=1e-5, rtol=0)
