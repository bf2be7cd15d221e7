"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout with q/k/v biases, and sliding-window layers
where ``config.layer_types`` marks them (``use_sliding_window``; none in Qwen2.5's released
configs)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rotary_graph_config
from .llama import layer_types_window, llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    return llama_layer(model, i, sliding_window=layer_types_window(model.config, i))


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "Qwen2ForCausalLM", _layer)


FAMILY = Family(classes=("Qwen2ForCausalLM",), adapter=adapter, model_types=("qwen2",),
                graph_config=rotary_graph_config)
