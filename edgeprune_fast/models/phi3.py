"""Phi-3 (``Phi3ForCausalLM``): Llama's layout with a fused ``qkv_proj`` (rows q | k | v, each
per head), viewed as one [H + 2K, D, dh] projection (``LayerSpec.W_QKV``) and sliced into
W_Q / W_K / W_V; the fused ``gate_up_proj`` stays inside HF's MLP module, which the MLP
reader calls whole. ``config.sliding_window`` (Phi-3-mini: 2047) applies to every layer;
partial rotary (``partial_rotary_factor``) is HF's own rotary function."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, linear_heads, rotary_graph_config
from .llama import llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    W, b = linear_heads(model.model.layers[i].self_attn.qkv_proj, H + 2 * K)  # [H + 2K, D, dh]
    roles = (slice(0, H), slice(H, H + K), slice(H + K, H + 2 * K))
    W_Q, W_K, W_V = (W[r] for r in roles)
    b_Q, b_K, b_V = (None if b is None else b[r] for r in roles)
    return llama_layer(model, i, W_QKV=W, b_QKV=b, W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V,
                       sliding_window=cfg.sliding_window)


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "Phi3ForCausalLM", _layer)


FAMILY = Family(classes=("Phi3ForCausalLM",), adapter=adapter, model_types=("phi3",),
                graph_config=rotary_graph_config)
