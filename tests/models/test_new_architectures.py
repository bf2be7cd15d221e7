"""The newer families (Gemma, Gemma-2, Mistral, Qwen3, Phi-3, OLMo-2) beyond the parametrised
float32 tests: float64 against the HF model and the slow reference, what their adapters
declare, the post-norm writers' identities (Gemma-2, OLMo-2) checked on HF's own modules,
and Gemma's embedding scale in the model dtype."""

from __future__ import annotations

import math

import pytest
import torch
from _slow_reference import slow_forward
from _tiny import NEW_ARCHS, VOCAB, tiny_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from edgeprune_fast.model import EdgePrunedModel

# HF's RMSNorms, eager softmax and rotary tables compute in float32 inside a float64 model
TOL64 = 2e-6


def _ids(seed, B=3, S=9):  # S = 9 > the tiny models' sliding window of 4
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _random_edges(graph, seed):
    g = torch.Generator().manual_seed(seed)
    return [e for e in graph.edges() if torch.rand(1, generator=g).item() < 0.5]


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_float64_all_edges_equal_hf_and_random_circuits_equal_slow_reference(arch, one_thread):
    model = tiny_model(arch, dtype=torch.float64)
    ids, cids = _ids(0), _ids(1)
    pruned = EdgePrunedModel.from_hf(model, ablation="zero")
    pruned.set_circuit(pruned.graph.edges())
    with torch.no_grad():
        err = (pruned(ids).logits - model(ids).logits).abs().max().item()
        print(f"{arch}: all edges kept, float64, max |logit - HF| = {err:.2e}")
        assert err < TOL64
        everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
        ablated = slow_forward(model, cids, everything)[1]
        for ablation in ("corrupted", "zero"):
            pruned = EdgePrunedModel.from_hf(model, ablation=ablation)
            edges = _random_edges(pruned.graph, 7)
            pruned.set_circuit(edges)
            want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges},
                                   ablated=ablated if ablation == "corrupted" else None)
            got = pruned(ids, cids if ablation == "corrupted" else None).logits
            torch.testing.assert_close(got, want, atol=TOL64, rtol=0)
            assert (want - model(ids).logits).abs().max() > 1e-2


def test_qwen2_sliding_window_layers(one_thread):
    """Qwen2 with use_sliding_window: the layers from max_window_layers on are windowed."""
    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=24, initializer_range=0.1,
                      use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = Qwen2ForCausalLM(cfg).double().eval()
    pruned = EdgePrunedModel.from_hf(model)
    assert [s.sliding_window for s in pruned.adapter.layers] == [None, 4]
    ids, cids = _ids(0), _ids(1)
    with torch.no_grad():
        pruned.set_circuit(pruned.graph.edges())
        torch.testing.assert_close(pruned(ids, cids).logits, model(ids).logits, atol=TOL64, rtol=0)
        everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
        edges = _random_edges(pruned.graph, 2)
        pruned.set_circuit(edges)
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges},
                               ablated=slow_forward(model, cids, everything)[1])
        torch.testing.assert_close(pruned(ids, cids).logits, want, atol=TOL64, rtol=0)


# arch: (sliding window per layer, attention softcap, final softcap, post-norm gain offset or None,
#        q/k norms, over all heads, fused qkv view)
DECLARED = {
    "gemma": ((None, None), None, None, None, False, False, False),
    "gemma2": ((4, None), 2.0, 3.0, 1.0, False, False, False),
    "mistral": ((4, 4), None, None, None, False, False, False),
    "qwen3": ((None, 4), None, None, None, True, False, False),
    "phi3": ((4, 4), None, None, None, False, False, True),
    "olmo2": ((None, None), None, None, 0.0, True, True, False),
}


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_adapters_declare_what_the_family_differs_in(arch):
    windows, softcap, final_softcap, offset, qk, over_heads, fused = DECLARED[arch]
    model = tiny_model(arch)
    a = EdgePrunedModel.from_hf(model).adapter
    assert tuple(s.sliding_window for s in a.layers) == windows
    assert a.final_softcap == final_softcap
    for i, s in enumerate(a.layers):
        layer = model.model.layers[i]
        assert s.softcap == softcap and s.qk_norm_over_heads == over_heads and (s.W_QKV is not None) == fused
        assert (s.q_norm is layer.self_attn.q_norm and s.k_norm is layer.self_attn.k_norm) if qk else \
            (s.q_norm is None and s.k_norm is None)
        if offset is None:
            assert s.attn_post_norm is None and s.mlp_post_norm is None
        else:  # views of HF's post-norm weights, with their eps and gain offset
            for spec, hf in ((s.attn_post_norm, layer.post_attention_layernorm),
                             (s.mlp_post_norm, layer.post_feedforward_layernorm)):
                assert spec.weight is hf.weight and spec.offset == offset and spec.eps == model.config.rms_norm_eps


def _hf_post_norm_parts(model, layer: int, ids, drop_head: int | None = None):
    """HF's forward with hooks: (logits, z [B, S, H*dh] into o_proj, o_proj's output o, the
    post-attention norm's output, the post-MLP norm's output). drop_head: subtract that head's
    share g * o_h / rms(o) (from the maths, on HF's weights) from the post-norm's output."""
    blk, got = model.model.layers[layer], {}
    at, norm = blk.self_attn, blk.post_attention_layernorm
    gain = norm.weight + (1.0 if type(model).__name__.startswith("Gemma") else 0.0)
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon

    def post_attention(module, args, output):
        got["normed"] = output
        if drop_head is None:
            return None
        dh = at.head_dim
        z_h = got["z"][..., drop_head * dh:(drop_head + 1) * dh]
        o = args[0]
        share = gain * (z_h @ at.o_proj.weight[:, drop_head * dh:(drop_head + 1) * dh].T) / \
            torch.sqrt((o * o).mean(-1, keepdim=True) + eps)
        return output - share

    handles = [at.o_proj.register_forward_pre_hook(lambda m, args: got.update(z=args[0])),
               at.o_proj.register_forward_hook(lambda m, args, out: got.update(o=out)),
               norm.register_forward_hook(post_attention),
               blk.post_feedforward_layernorm.register_forward_hook(lambda m, args, out: got.update(mlp=out))]
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_post_norm_writers_are_shares_of_hf_normed_outputs(arch, one_thread):
    """The heads' writers sum to HF's post-attention norm output, the MLP writer is HF's post-MLP
    norm output, and removing head h from every reader under zero ablation is HF's model with
    that head's share g * o_h / rms(o) taken out of the residual."""
    model = tiny_model(arch, dtype=torch.float64)
    pruned = EdgePrunedModel.from_hf(model, ablation="zero")
    ids, layer, head = _ids(0), 0, 1
    g = pruned.graph
    with torch.no_grad():
        _, states = pruned.reference(ids)
        _, parts = _hf_post_norm_parts(model, layer, ids)
        first = g.slot(f"a{layer}.h0")
        heads = states[first:first + model.config.num_attention_heads]
        torch.testing.assert_close(heads.sum(0), parts["normed"], atol=TOL64, rtol=0)
        torch.testing.assert_close(states[g.slot(f"m{layer}")], parts["mlp"], atol=TOL64, rtol=0)
        assert heads.abs().amax((1, 2, 3)).min() > 1e-2  # every head writes something
        pruned.set_circuit([e for e in g.edges() if e.writer != f"a{layer}.h{head}"])
        want, _ = _hf_post_norm_parts(model, layer, ids, drop_head=head)
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, atol=TOL64, rtol=0)
    assert (want - model(ids).logits).abs().max() > 1e-2


def test_gemma_embeds_writer_is_scaled_in_the_model_dtype():
    model = tiny_model("gemma2", dtype=torch.bfloat16)
    pruned = EdgePrunedModel.from_hf(model)
    ids = _ids(0)
    with torch.no_grad():
        _, states = pruned.reference(ids)
    scale = torch.tensor(math.sqrt(model.config.hidden_size), dtype=torch.bfloat16)  # 5.65625, not 5.6569
    assert scale.item() != math.sqrt(model.config.hidden_size)
    assert torch.equal(states[0], model.model.embed_tokens.weight[ids] * scale)
