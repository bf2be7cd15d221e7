"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout with q/k/v biases; sliding-window attention
is refused (no layer of Qwen2.5's released configs uses it)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rotary_graph_config
from .llama import llama_like_adapter


def adapter(model: nn.Module) -> Adapter:
    cfg = model.config
    sliding = [i for i, t in enumerate(getattr(cfg, "layer_types", None) or []) if t == "sliding_attention"]
    if getattr(cfg, "use_sliding_window", False) or sliding:
        raise NotImplementedError(f"Qwen2ForCausalLM with sliding-window attention is not supported "
                                  f"(config.use_sliding_window={cfg.use_sliding_window}, sliding layers {sliding})")
    return llama_like_adapter(model, "Qwen2ForCausalLM")


FAMILY = Family(classes=("Qwen2ForCausalLM",), adapter=adapter, model_types=("qwen2",),
                graph_config=rotary_graph_config)
