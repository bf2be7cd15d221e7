"""GPT-2 (``GPT2LMHeadModel``): learned absolute positions (so ``split_embeds`` is allowed),
LayerNorms, a fused Conv1D ``c_attn`` (x @ w + b, w [D, 3D], q | k | v along the output),
which gives the attention readers one [3H, D, dh] projection view (``LayerSpec.W_QKV``)."""

from __future__ import annotations

import functools

from torch import nn

from ..graph import GraphConfig
from .base import Adapter, Family, LayerSpec, hf_body_forward, hf_forward


def _layer(model: nn.Module, i: int) -> LayerSpec:
    block, H, D = model.transformer.h[i], model.config.n_head, model.config.n_embd
    at = block.attn
    w, b = at.c_attn.weight, at.c_attn.bias
    heads = [w[:, j * D:(j + 1) * D].view(D, H, D // H).transpose(0, 1) for j in range(3)]
    biases = [b[j * D:(j + 1) * D].view(H, D // H) for j in range(3)]
    return LayerSpec(
        attn_norm=block.ln_1, mlp_norm=block.ln_2,
        W_Q=heads[0], b_Q=biases[0], W_K=heads[1], b_K=biases[1], W_V=heads[2], b_V=biases[2],
        W_O=at.c_proj.weight.view(H, D // H, D), b_O=at.c_proj.bias,
        mlp=block.mlp, scale=float(at.scaling), o_proj=at.c_proj,
        W_QKV=w.view(D, 3 * H, D // H).transpose(0, 1), b_QKV=b.view(3 * H, D // H), block=block)


def adapter(model: nn.Module) -> Adapter:
    cfg = model.config
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, flag, False):
            raise NotImplementedError(f"GPT2LMHeadModel with config.{flag}=True is not supported")
    tr = model.transformer
    layer_fn = functools.partial(_layer, model)
    return Adapter(
        architecture="GPT2LMHeadModel", model=model, layers=tuple(map(layer_fn, range(len(tr.h)))),
        d_model=cfg.n_embd, n_ctx=cfg.n_positions, embed_tokens=tr.wte, embed_positions=tr.wpe, rotary=None,
        apply_rotary=None, final_norm=tr.ln_f, unembed=model.lm_head, full_forward=hf_forward(model),
        body_forward=hf_body_forward(model), layer_fn=layer_fn)


def graph_config(config, split_embeds: bool = False) -> GraphConfig:
    return GraphConfig(config.n_layer, config.n_head, None, split_embeds, False)


FAMILY = Family(classes=("GPT2LMHeadModel",), adapter=adapter, model_types=("gpt2",), graph_config=graph_config)
