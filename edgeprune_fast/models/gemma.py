"""Gemma (``GemmaForCausalLM``): Llama's layout with RMSNorm gains ``1 + weight`` (HF's
modules), a GELU-gated MLP, head_dim independent of d_model / H (256), multi-query attention
in Gemma-2B, and the token embedding scaled by sqrt(d_model): HF's ``embed_tokens`` (a scaled
word embedding since transformers 5.4) multiplies by the scale rounded to the model dtype, so
the ``embeds`` writer is the scaled embedding, as HF's residual stream starts."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rotary_graph_config
from .llama import llama_like_adapter


def check_gemma_model(model: nn.Module) -> None:
    """What the Gemma families need of HF's model: the scale inside ``embed_tokens`` (else the
    embeds writer would miss it) and causal attention."""
    name = type(model).__name__
    if not hasattr(model.model.embed_tokens, "embed_scale"):
        raise NotImplementedError(f"{name}: embed_tokens has no embed_scale (transformers before 5.4 scale the "
                                  f"embedding in the model's forward); expected transformers >= 5.4")
    if getattr(model.config, "use_bidirectional_attention", False):
        raise NotImplementedError(f"{name} with config.use_bidirectional_attention=True is not supported")


def adapter(model: nn.Module) -> Adapter:
    check_gemma_model(model)
    return llama_like_adapter(model, "GemmaForCausalLM")


FAMILY = Family(classes=("GemmaForCausalLM",), adapter=adapter, model_types=("gemma",),
                graph_config=rotary_graph_config)
