"""Llama (``LlamaForCausalLM``): rotary positions (one ``embeds`` writer), RMSNorms, separate
q/k/v/o projections (biases when ``config.attention_bias``), grouped-query attention with
one k and one v reader per KV head (graph.py names them ``a{l}.g{g}.k``/``.v``). The layer
builder and the adapter serve every family laid out like Llama (``model.model.layers[i]`` with
``self_attn.{q,k,v,o}_proj``): Qwen2/3, Mistral, Gemma, Gemma-2, Phi-3, OLMo-2 pass what
differs (norms, windows, softcaps, fused views) as LayerSpec / Adapter fields."""

from __future__ import annotations

import functools

from torch import nn

from .base import (
    Adapter,
    Family,
    LayerSpec,
    hf_body_forward,
    hf_forward,
    linear_heads,
    linear_out_heads,
    rotary_fn,
    rotary_graph_config,
)


def llama_layer(model: nn.Module, i: int, **fields) -> LayerSpec:
    """Layer i of a Llama-layout decoder: ``model.model.layers[i]`` with ``self_attn.{q,k,v,o}_proj``,
    ``input_layernorm``, ``post_attention_layernorm`` and ``mlp``; ``fields`` replace or add
    LayerSpec fields (e.g. another MLP norm, q/k norms, a sliding window)."""
    cfg, layer = model.config, model.model.layers[i]
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    at = layer.self_attn
    spec = dict(mlp=layer.mlp, scale=float(at.scaling), o_proj=at.o_proj, block=layer)
    for field, name in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        if field not in fields:  # OLMo-2 has neither
            spec[field] = getattr(layer, name)
    if "W_Q" not in fields:
        (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = (linear_heads(p, n) for p, n in
                                              ((at.q_proj, H), (at.k_proj, K), (at.v_proj, K)))
        spec |= dict(W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V)
    W_O, b_O = linear_out_heads(at.o_proj, H)
    return LayerSpec(**(spec | dict(W_O=W_O, b_O=b_O) | fields))


def layer_types_window(cfg, i: int) -> int | None:
    """Layer i's sliding window where the config lists ``layer_types`` (Gemma-2, Qwen2/3): its
    ``sliding_window`` on 'sliding_attention' layers, None on the others."""
    types = getattr(cfg, "layer_types", None)
    return cfg.sliding_window if types is not None and types[i] == "sliding_attention" else None


def llama_like_adapter(model: nn.Module, architecture: str, layer=llama_layer, **fields) -> Adapter:
    """The adapter of a Llama-layout causal LM (``model.model`` with ``embed_tokens``, ``layers``,
    ``norm``, ``rotary_emb``; ``model.lm_head``); ``layer``: (model, i) -> LayerSpec;
    ``fields``: further Adapter fields (e.g. final_softcap)."""
    cfg, base = model.config, model.model
    layer_fn = functools.partial(layer, model)
    return Adapter(
        architecture=architecture, model=model, layers=tuple(map(layer_fn, range(len(base.layers)))),
        d_model=cfg.hidden_size, n_ctx=cfg.max_position_embeddings, embed_tokens=base.embed_tokens,
        embed_positions=None, rotary=base.rotary_emb, apply_rotary=rotary_fn(base.layers[0].self_attn),
        final_norm=base.norm, unembed=model.lm_head, full_forward=hf_forward(model),
        body_forward=hf_body_forward(model), layer_fn=layer_fn, **fields)


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "LlamaForCausalLM")


FAMILY = Family(classes=("LlamaForCausalLM",), adapter=adapter, model_types=("llama",),
                graph_config=rotary_graph_config)
