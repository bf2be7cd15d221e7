"""Mistral (``MistralForCausalLM``): Llama's layout; ``config.sliding_window`` (when set)
applies to every layer (Mistral-7B-v0.1: 4096; v0.3: none)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rotary_graph_config
from .llama import llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    return llama_layer(model, i, sliding_window=model.config.sliding_window)


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "MistralForCausalLM", _layer)


FAMILY = Family(classes=("MistralForCausalLM",), adapter=adapter, model_types=("mistral",),
                graph_config=rotary_graph_config)
