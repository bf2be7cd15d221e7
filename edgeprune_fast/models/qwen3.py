"""Qwen3 (``Qwen3ForCausalLM``): Llama's layout with RMSNorms on each head's query and key
(``self_attn.q_norm`` / ``k_norm`` over dh, before rotary), and sliding-window layers where
``config.layer_types`` marks them (``use_sliding_window``; none in Qwen3's released configs)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rotary_graph_config
from .llama import layer_types_window, llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    at = model.model.layers[i].self_attn
    return llama_layer(model, i, q_norm=at.q_norm, k_norm=at.k_norm,
                       sliding_window=layer_types_window(model.config, i))


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "Qwen3ForCausalLM", _layer)


FAMILY = Family(classes=("Qwen3ForCausalLM",), adapter=adapter, model_types=("qwen3",),
                graph_config=rotary_graph_config)
