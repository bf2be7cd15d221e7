"""EdgePrunedModel's API: construction, errors, masks and their state, devices and modes."""

from __future__ import annotations

import pytest
import torch
from _tiny import CTX, VOCAB, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.models import graph_config_from_hf


def _ids(B=2, S=6, seed=0):
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def test_bad_inputs_are_clear_errors(gpt2):
    pruned = EdgePrunedModel.from_hf(gpt2)
    ids = _ids()
    with pytest.raises(ValueError, match=r"corrupted_input_ids: expected the shape of input_ids \(2, 6\), got \(2, 7\)"):
        pruned(ids, _ids(S=7))
    with pytest.raises(ValueError, match="corrupted_input_ids: required under ablation='corrupted'"):
        pruned(ids)
    with pytest.raises(ValueError, match=f"longer than the model's context of {CTX}"):
        pruned(_ids(S=CTX + 1), _ids(S=CTX + 1))
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        pruned(ids.float(), ids)
    with pytest.raises(ValueError, match=r"token ids in \[0, 61\)"):
        pruned(ids + VOCAB, ids)
    with pytest.raises(ValueError, match="attention_mask: expected a 0/1 tensor of the input's shape"):
        pruned(ids, ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"corrupted_writers: expected the corrupted run's writer states"):
        pruned(ids, corrupted_writers=torch.zeros(3, 2, 6, 32))
    with pytest.raises(ValueError, match="ablation: expected one of"):
        EdgePrunedModel.from_hf(gpt2, ablation="resample")
    with pytest.raises(ValueError, match="mean_writers: expected a tensor"):
        EdgePrunedModel.from_hf(gpt2, ablation="mean")


def test_unsupported_models():
    with pytest.raises(NotImplementedError, match="Linear is not supported; supported architectures: "
                                                  r"GemmaForCausalLM, .*GPT2LMHeadModel, .*Qwen3ForCausalLM "
                                                  r"\(and tracr exports"):
        EdgePrunedModel.from_hf(torch.nn.Linear(2, 2))
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8, reorder_and_upcast_attn=True)
    with pytest.raises(NotImplementedError, match="reorder_and_upcast_attn"):
        EdgePrunedModel.from_hf(GPT2LMHeadModel(cfg))
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(NotImplementedError, match="scale_attn_by_inverse_layer_idx"):
        EdgePrunedModel.from_hf(GPT2LMHeadModel(cfg))
    with pytest.raises(ValueError, match="split_embeds: LlamaForCausalLM has no absolute position embedding"):
        EdgePrunedModel.from_hf(tiny_model("llama"), split_embeds=True)


SUPPORTED = ("GemmaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM",
             "MistralForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
TINY = dict(vocab_size=10, num_hidden_layers=1, num_attention_heads=2, hidden_size=8)


@pytest.mark.parametrize("name,config", [
    ("GPTJ", dict(vocab_size=10, n_layer=1, n_head=2, n_embd=8, rotary_dim=2)),
    ("OPT", dict(vocab_size=10, num_hidden_layers=1, num_attention_heads=2, hidden_size=8, ffn_dim=8,
                 word_embed_proj_dim=8)),
    ("Bloom", dict(vocab_size=10, n_layer=1, n_head=2, hidden_size=8)),
    ("Falcon", TINY),
    ("Mixtral", TINY | dict(num_key_value_heads=1, intermediate_size=8, num_local_experts=2)),
])
def test_unsupported_hf_architectures_are_refused_naming_the_supported(name, config):
    import transformers

    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**config))
    with pytest.raises(NotImplementedError, match=f"model: {name}ForCausalLM is not supported; supported "
                                                  "architectures: ") as err:
        EdgePrunedModel.from_hf(model)
    assert all(c in str(err.value) for c in SUPPORTED)
    assert "racr" not in str(err.value)  # an HF model is not offered the tracr loader
    with pytest.raises(NotImplementedError, match=f"config: model_type '{model.config.model_type}' "
                                                  f"\\({name}ForCausalLM\\) is not supported; supported ") as err:
        model.config.architectures = [f"{name}ForCausalLM"]  # as save_pretrained writes it
        graph_config_from_hf(model.config)  # what `plan --model DIR` reads
    assert all(c in str(err.value) for c in SUPPORTED)


def test_unknown_circuit_edge_names_it(gpt2):
    pruned = EdgePrunedModel.from_hf(gpt2)
    with pytest.raises(ValueError, match=r"'a0.h7->a1.h0.q' does not exist: unknown writer 'a0.h7'; did you mean"):
        pruned.set_circuit(["a0.h1->a1.h0.q", "a0.h7->a1.h0.q"])
    with pytest.raises(ValueError, match="single edge"):
        pruned.set_circuit("a0.h1->a1.h0.q")
    assert pruned.masks.circuit is None


def test_from_pretrained_local_directory(tmp_path):
    model = tiny_model("neox")
    model.save_pretrained(tmp_path / "m")
    pruned = EdgePrunedModel.from_pretrained(tmp_path / "m", ablation="zero")
    assert pruned.adapter.parallel_mlp
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids(), training=False).logits, model(_ids()).logits, atol=1e-5, rtol=0)
    for missing in (tmp_path / "nope", "EleutherAI/pythia-70m"):
        with pytest.raises(ValueError, match="expected a local directory written by save_pretrained"):
            EdgePrunedModel.from_pretrained(missing)


def test_mask_state_roundtrip_and_files(gpt2, tmp_path):
    torch.manual_seed(0)
    a = EdgePrunedModel.from_hf(gpt2, init=3.0, init_std=1.0)
    b = EdgePrunedModel.from_hf(gpt2)
    assert abs(float(a.masks.edge_log_alpha[0].detach().mean()) - 3.0) < 0.5
    sd = a.mask_state_dict()
    assert list(sd) == ["edges.a0", "edges.m0", "edges.a1", "edges.m1", "edges.a2", "edges.m2", "edges.resid_post",
                        "nodes"]
    assert sd["edges.a1"].shape == (12, 1 + 5) and sd["nodes"].shape == (a.graph.n_writers,)
    b.load_mask_state_dict(sd)
    torch.testing.assert_close(b.edge_scores(), a.edge_scores())
    a.save_masks(tmp_path / "m.safetensors")
    c = EdgePrunedModel.from_hf(gpt2)
    c.load_masks(tmp_path / "m.safetensors")
    torch.testing.assert_close(c.edge_scores(), a.edge_scores())
    torch.testing.assert_close(c.node_scores(), a.node_scores())
    with pytest.raises(ValueError, match="missing keys"):
        b.load_mask_state_dict({k: v for k, v in sd.items() if k != "nodes"})
    with pytest.raises(ValueError, match=r"'edges.a0' expected shape \(12, 1\)"):
        b.load_mask_state_dict({**sd, "edges.a0": torch.zeros(3, 3)})
    other = EdgePrunedModel.from_hf(gpt2, split_embeds=True)
    with pytest.raises(ValueError, match="masks of another graph"):
        other.load_masks(tmp_path / "m.safetensors")


def test_scores_parameters_and_sparsity(gpt2):
    pruned = EdgePrunedModel.from_hf(gpt2, node_masks=False)
    assert pruned.node_log_alpha_parameters() == [] and pruned.node_scores() is None
    scores = pruned.edge_scores()
    assert scores.shape == (pruned.graph.n_edges,)
    edges, writers = pruned.graph.edges(), pruned.edge_writer_index()
    names = pruned.graph.writer_names()
    assert all(names[int(writers[i])] == edges[i].writer for i in range(0, len(edges), 7))
    with torch.no_grad():  # raise one edge's log_alpha: the score in graph order moves
        gi, row, col = pruned.graph.edge_index(edges[40])
        pruned.masks.edge_log_alpha[gi][row, col] = 50.0
    assert int(pruned.edge_scores().argmax()) == 40
    keep = edges[:10]
    pruned.set_circuit(keep)
    out = pruned(_ids(), _ids(seed=1))
    assert abs(float(out.edge_sparsity.detach()) - (1 - 10 / len(edges))) < 1e-6
    assert abs(float(out.sampled_edge_sparsity) - (1 - 10 / len(edges))) < 1e-6
    pruned.clear_circuit()
    out = pruned(_ids(), _ids(seed=1), training=False)
    assert float(out.edge_sparsity.detach()) < 1e-3 and float(out.sampled_edge_sparsity) == 0.0


def test_modes_dtype_and_frozen_weights():
    gpt2 = tiny_model("gpt2")
    pruned = EdgePrunedModel.from_hf(gpt2)
    assert all(not p.requires_grad for p in gpt2.parameters())
    pruned.train()
    assert pruned.training and pruned.masks.training and not gpt2.training  # no dropout in the HF modules
    pruned.to(torch.bfloat16)
    assert pruned.adapter.dtype == torch.bfloat16 and pruned.adapter.layers[0].W_Q.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters())
    out = pruned(_ids(), _ids(seed=1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
