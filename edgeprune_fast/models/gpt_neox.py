"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): partial rotary, LayerNorms, a per-head
interleaved ``query_key_value`` (rows per head [q_h | k_h | v_h], HF views it [.., H, 3*dh]),
and a parallel attention + MLP block when ``config.use_parallel_residual`` (the MLP then
reads the layer's input, so the layer's heads do not feed it)."""

from __future__ import annotations

import functools

from torch import nn

from .base import (
    Adapter,
    Family,
    LayerSpec,
    hf_body_forward,
    hf_forward,
    linear_out_heads,
    rotary_fn,
    rotary_graph_config,
)


def _layer(model: nn.Module, i: int) -> LayerSpec:
    cfg, layer = model.config, model.gpt_neox.layers[i]
    H, D = cfg.num_attention_heads, cfg.hidden_size
    dh = D // H
    at = layer.attention
    w = at.query_key_value.weight.view(H, 3, dh, D).transpose(2, 3)  # [H, 3, D, dh]
    b = None if at.query_key_value.bias is None else at.query_key_value.bias.view(H, 3, dh)
    W_O, b_O = linear_out_heads(at.dense, H)
    return LayerSpec(
        attn_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm,
        W_Q=w[:, 0], b_Q=None if b is None else b[:, 0], W_K=w[:, 1], b_K=None if b is None else b[:, 1],
        W_V=w[:, 2], b_V=None if b is None else b[:, 2], W_O=W_O, b_O=b_O,
        mlp=layer.mlp, scale=float(at.scaling), o_proj=at.dense, block=layer)


def adapter(model: nn.Module) -> Adapter:
    cfg, base = model.config, model.gpt_neox
    layer_fn = functools.partial(_layer, model)
    return Adapter(
        architecture="GPTNeoXForCausalLM", model=model, layers=tuple(map(layer_fn, range(len(base.layers)))),
        d_model=cfg.hidden_size, n_ctx=cfg.max_position_embeddings, embed_tokens=base.embed_in,
        embed_positions=None, rotary=base.rotary_emb, apply_rotary=rotary_fn(base.layers[0].attention),
        final_norm=base.final_layer_norm, unembed=model.lm_head, full_forward=hf_forward(model),
        body_forward=hf_body_forward(model), parallel_mlp=bool(cfg.use_parallel_residual), layer_fn=layer_fn)


def graph_config(config, split_embeds: bool = False):
    return rotary_graph_config(config, split_embeds, parallel_mlp=bool(config.use_parallel_residual))


FAMILY = Family(classes=("GPTNeoXForCausalLM",), adapter=adapter, model_types=("gpt_neox",),
                graph_config=graph_config)
