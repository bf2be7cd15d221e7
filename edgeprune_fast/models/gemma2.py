"""Gemma-2 (``Gemma2ForCausalLM``, MIB's model): Gemma (gains ``1 + weight``, embedding scaled
by sqrt(d_model) inside ``embed_tokens``, head_dim 256, grouped KV) with

- RMSNorms on the attention and MLP outputs before the residual (``post_attention_layernorm``,
  ``post_feedforward_layernorm``; the MLP reads ``pre_feedforward_layernorm`` of its input):
  head h's writer is its share g * o_h / rms(o) of the normed attention output, g = 1 +
  weight, o = sum_h o_h the whole attention output, so the writers sum to the norm's output;
  the MLP writer is the normed MLP output (writers.py);
- attention-logit softcapping (c * tanh(scores / c), c = 50; the attention is then computed
  explicitly, SDPA having no softcap) and final-logit softcapping (c = 30);
- sliding-window attention (4096) on the layers ``config.layer_types`` marks, full attention
  on the others (alternating, from layer 0);
- scores scaled by ``query_pre_attn_scalar ** -0.5`` (HF's ``scaling``) instead of dh ** -0.5.

The softcap is applied whatever ``config._attn_implementation`` says: transformers 5.17 loads
Gemma-2 with SDPA by default, whose path drops the attention softcap, so compare with HF's
``attn_implementation="eager"`` (as HF advises for Gemma-2); transformers 5.24 offers no SDPA for it.

**MIB / EAP-IG's graph on TransformerLens** (``use_normalization_before_and_after``; read in
hannamw/EAP-IG's graph.py, utils.py and evaluate.py at the commit MIB-circuit-track pins, and
TransformerLens' components/transformer_block.py). Their attention node a{l}.h{h} writes
``attn.hook_result`` = z_h W_O[h], *before* ``ln1_post`` (the post-attention norm); their MLP
node writes ``hook_mlp_out``, after ``ln2_post``, as ours; ``hook_embed`` is the scaled
embedding, as ours; k/v readers are per query head (``ungroup_grouped_query_attention``),
ours per KV head. To evaluate a circuit, ``evaluate_graph`` builds each reader's input as the
clean residual plus, for each earlier layer, ln1_post(b_O + sum_h m_h) - ln1_post(b_O + sum_h
clean_h), m_h = clean_h when the edge is in the circuit, the corrupted (or, zero ablation, no)
output otherwise: the post-norm is recomputed per reader on the *mix* of that layer's heads.
Here the rms is the clean (or corrupted) output's, whatever a reader keeps. So a circuit
means the same in both where, for every reader, each layer's heads are all kept or all
removed (both give ln1_post(o) or ln1_post(o~)), and for the full and the empty circuit; it
differs where a reader keeps some of a layer's heads: there removing a head rescales the
kept ones by rms(o) / rms(mix) (under zero ablation a lone kept head is normed to the
layer's full scale), while here the kept heads' contributions stay as in the model, and the
layer's removed heads are exactly their shares. (Their attribution scores, EAP / EAP-IG,
multiply the pre-norm difference of hook_result by the gradient at the reader's input,
leaving out ln1_post's Jacobian, about g / rms(o).)

``EdgePrunedModel.from_hf(..., post_norm="reader")`` (``--post-norm reader``; the default of
``edgeprune mib evaluate`` under MIB's conventions for this family) follows theirs exactly:
head writers z_h W_O[h], each reader norming its own mix of every upstream layer's heads, in
training and evaluation, with gradients (post_norm.py). The default stays "writer" (above).
Against MIB's own evaluation on a tiny Gemma-2 (bench/mib_agreement.py, results in
bench/results/mib_agreement.json): faithfulness within 7e-6 under patching, 1.4e-5 under zero
ablation in float64 (in float32, 2e-3: EAP-IG builds a reader whose every edge is removed as
actual - sum(actual), float32 rounding rather than 0, which Gemma-2's bias-free RMSNorms scale
up: its empty circuit's logits reach 4e-3 where they are 0); the default "writer" mode is
0.36 away under patching. TransformerLens 2.9.1 itself differs from HF in
two places that matter only off MIB's path: it windows the odd layers where HF windows the
even ones (``attn_types = ["global", "local", ...]``; MIB's prompts are far shorter than the
4096-token window), and it has Gemma-2 configs by hub name only.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rms_norm_of, rotary_graph_config
from .gemma import check_gemma_model
from .llama import layer_types_window, llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    cfg, layer = model.config, model.model.layers[i]
    return llama_layer(model, i, mlp_norm=layer.pre_feedforward_layernorm,
                       attn_post_norm=rms_norm_of(layer.post_attention_layernorm, 1.0),
                       mlp_post_norm=rms_norm_of(layer.post_feedforward_layernorm, 1.0),
                       softcap=cfg.attn_logit_softcapping, sliding_window=layer_types_window(cfg, i))


def adapter(model: nn.Module) -> Adapter:
    check_gemma_model(model)
    return llama_like_adapter(model, "Gemma2ForCausalLM", _layer, final_softcap=model.config.final_logit_softcapping)


FAMILY = Family(classes=("Gemma2ForCausalLM",), adapter=adapter, model_types=("gemma2",),
                graph_config=rotary_graph_config)
