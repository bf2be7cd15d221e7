"""EdgePrunedModel against the unmodified HF model and an independent slow reference."""

from __future__ import annotations

import pytest
import torch
from _slow_reference import slow_forward
from _tiny import ARCHS, VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel

TOL = 1e-5
CASES = [(a, False) for a in ARCHS] + [("gpt2", True)]  # (architecture, split_embeds)


def _ids(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, S), generator=g)


def _padding(kind: str, B=3, S=9):
    if kind == "none":
        return None
    m = torch.ones(B, S, dtype=torch.long)
    lengths = [S, S - 3, S - 5]
    for b, n in enumerate(lengths):
        if kind == "left":
            m[b, : S - n] = 0
        else:
            m[b, n:] = 0
    return m


@pytest.mark.parametrize("arch,split", CASES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_all_masks_one_equals_hf(arch, split, padding):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, split_embeds=split, ablation="zero")
    ids, mask = _ids(), _padding(padding)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        pruned.set_circuit(pruned.graph.edges())  # masks exactly 1
        got = pruned(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        # learned masks at their initial log_alpha ~ 10: deterministic masks are exactly 1 too
        pruned.clear_circuit()
        got_det = pruned(ids, attention_mask=mask, training=False).logits
        torch.testing.assert_close(got_det, want, atol=TOL, rtol=0)
        # the reference forward returns the same logits, and its writers sum to the residual stream
        ref_logits, states = pruned.reference(ids, mask)
        torch.testing.assert_close(ref_logits, want, atol=TOL, rtol=0)
        assert states.shape == (pruned.graph.n_writers, *ids.shape, model.config.hidden_size)


@pytest.mark.parametrize("arch,split", CASES)
def test_all_masks_zero_corrupted_equals_hf_on_corrupted_input(arch, split):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, split_embeds=split, ablation="corrupted")
    ids, cids = _ids(seed=0), _ids(seed=1)
    pruned.set_circuit([])
    with torch.no_grad():
        got = pruned(ids, cids).logits
        torch.testing.assert_close(got, model(cids).logits, atol=TOL, rtol=0)
        # precomputed corrupted writer states give the same
        _, states = pruned.reference(cids)
        torch.testing.assert_close(pruned(ids, corrupted_writers=states).logits, got, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_masks_zero_zero_ablation(arch):
    # every reader's input is 0; logits depend only on resid_post's input, so they are
    # unembed(final_norm(0)) at every position (LayerNorm(0) = its bias, RMSNorm(0) = 0)
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, ablation="zero")
    pruned.set_circuit([])
    ids = _ids()
    with torch.no_grad():
        a = pruned.adapter
        want = a.unembed(a.final_norm(torch.zeros(*ids.shape, model.config.hidden_size)))
        if a.final_softcap is not None:  # Gemma-2: c * tanh(logits / c)
            want = a.final_softcap * torch.tanh(want / a.final_softcap)
        got = pruned(ids).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        # and the slow reference agrees (every head and MLP is computed from zero inputs)
        torch.testing.assert_close(got, slow_forward(model, ids, set())[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch,split", CASES)
def test_reference_capture_equals_slow_writers(arch, split):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, split_embeds=split)
    ids = _ids()
    everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
    with torch.no_grad():
        _, slow = slow_forward(model, ids, everything, split_embeds=split)
        _, states = pruned.reference(ids)
    for i, w in enumerate(pruned.graph.writer_names()):
        torch.testing.assert_close(states[i], slow[w], atol=TOL, rtol=0, msg=f"writer {w}")


@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
@pytest.mark.parametrize("arch,split", CASES)
def test_random_circuit_equals_slow_reference(arch, split, ablation):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, split_embeds=split, ablation=ablation)
    ids, cids = _ids(seed=0), _ids(seed=1)
    g = torch.Generator().manual_seed(7)
    edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
    kept = {(e.writer, e.reader) for e in edges}
    everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
    with torch.no_grad():
        ablated = slow_forward(model, cids, everything, split_embeds=split)[1] if ablation == "corrupted" else None
        want, _ = slow_forward(model, ids, kept, ablated=ablated, split_embeds=split)
        pruned.set_circuit([str(e) for e in edges[::2]] + [e.as_pair() for e in edges[1::2]])  # text and pairs
        got = pruned(ids, cids if ablation == "corrupted" else None).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (want - model(ids).logits).abs().max() > 1e-2  # the circuit really changes the output


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_random_circuit_with_padding_equals_slow_reference(arch, padding):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model)
    ids, cids, mask = _ids(seed=0), _ids(seed=1), _padding(padding)
    g = torch.Generator().manual_seed(5)
    edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
    everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
    with torch.no_grad():
        ablated = slow_forward(model, cids, everything, attention_mask=mask)[1]
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated,
                               attention_mask=mask)
        pruned.set_circuit(edges)
        got = pruned(ids, cids, attention_mask=mask).logits
    real = mask.bool()  # padded query positions are meaningless (as in HF)
    torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=0)


def test_llama_head_dim_not_d_model_over_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      head_dim=16, intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=16,
                      initializer_range=0.1, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    pruned = EdgePrunedModel.from_hf(model, ablation="zero")
    pruned.set_circuit(pruned.graph.edges())
    ids, mask = _ids(), _padding("left")
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   atol=TOL, rtol=0)


def test_mean_ablation_equals_slow_reference():
    model = tiny_model("llama")
    probe = EdgePrunedModel.from_hf(model, ablation="zero")
    data = _ids(B=4, S=9, seed=3)
    means = probe.compute_mean_writers(data)
    assert probe.compute_mean_writers(data, per_position=True).shape == (probe.graph.n_writers, 9, 32)
    pruned = EdgePrunedModel.from_hf(model, ablation="mean", mean_writers=means)
    ids = _ids()
    g = torch.Generator().manual_seed(2)
    edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
    ablated = {w: means[i].expand(*ids.shape, -1) for i, w in enumerate(pruned.graph.writer_names())}
    with torch.no_grad():
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated)
        pruned.set_circuit(edges)
        torch.testing.assert_close(pruned(ids).logits, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma2", "olmo2"])  # the post-norm shares rounded once
def test_bfloat16_close_to_hf_bfloat16(arch):
    ref32 = tiny_model(arch)
    model = tiny_model(arch, dtype=torch.bfloat16)
    pruned = EdgePrunedModel.from_hf(model, ablation="zero").eval()
    assert all(p.dtype == torch.float32 for p in pruned.edge_log_alpha_parameters())
    ids, mask = _ids(), _padding("left")
    with torch.no_grad():
        want = ref32(ids, attention_mask=mask).logits
        hf_err = (model(ids, attention_mask=mask).logits.float() - want).abs().max()
        out = pruned(ids, attention_mask=mask)
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - want).abs().max() <= 2 * hf_err + 1e-3
