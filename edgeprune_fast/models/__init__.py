"""The supported model families, one module each (as HF lays out its models), found here.

    gemma      GemmaForCausalLM     Llama's layout, gains 1 + weight, embedding scaled by sqrt(d_model)
    gemma2     Gemma2ForCausalLM    Gemma with post-attention / post-MLP norms (head writers are shares
                                    of the normed output), softcaps, alternating sliding windows
    gpt2       GPT2LMHeadModel      learned absolute positions (split_embeds allowed), fused c_attn
    gpt_neox   GPTNeoXForCausalLM   partial rotary, per-head interleaved query_key_value, parallel
                                    attention + MLP when ``use_parallel_residual``
    llama      LlamaForCausalLM     rotary, RMSNorm, grouped-query attention (one k/v reader per KV head)
    mistral    MistralForCausalLM   Llama with a sliding window on every layer
    olmo2      Olmo2ForCausalLM     post-norms only, q/k norms over all heads' projection
    phi3       Phi3ForCausalLM      fused qkv_proj (one [H + 2K, D, dh] view), sliding window
    qwen2      Qwen2ForCausalLM     as Llama, with q/k/v biases, sliding windows by layer_types
    qwen3      Qwen3ForCausalLM     Llama with per-head q/k norms, sliding windows by layer_types
    tracr      TracrTransformer     tracr-compiled models (not an HF class; tracr.py loads them)

Every module of this package other than ``base`` exports ``FAMILY`` (a base.Family); adding
an architecture is adding one such module (and its tests): it is found by name, nothing
else to register. ``adapter_for(model)`` picks the family by the model's class (or a base
class); ``graph_config_from_hf(config)`` gives the graph of an HF config without weights.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from torch import nn

from ..graph import GraphConfig
from .base import Adapter, Family, LayerSpec, RMSNorm

__all__ = ["Adapter", "Family", "LayerSpec", "RMSNorm", "adapter_for", "families", "graph_config_from_hf",
           "supported_hf_architectures"]


@functools.cache
def families() -> dict[str, Family]:
    """{module name: Family} of every family module in this package, in name order."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            out[info.name] = importlib.import_module(f"{__name__}.{info.name}").FAMILY
    return out


def supported_hf_architectures() -> list[str]:
    """The HF model classes served (for messages about HF folders: tracr models are not HF's)."""
    return [c for f in families().values() if f.model_types for c in f.classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model`` (by its class or a base class); NotImplementedError naming the
    supported architectures otherwise."""
    by_class = {c: f for f in families().values() for c in f.classes}
    for cls in type(model).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__].adapter(model)
    hf = any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)
    others = "" if hf else " (and tracr exports, loaded with edgeprune_fast.tracr.load_tracr)"
    raise NotImplementedError(f"model: {type(model).__name__} is not supported; supported architectures: "
                              f"{', '.join(supported_hf_architectures())}{others}")


def graph_config_from_hf(config, *, split_embeds: bool = False) -> GraphConfig:
    """The graph of an HF config of a supported architecture, without building weights
    (e.g. ``Graph(graph_config_from_hf(GPT2Config())).n_edges == 32491``)."""
    kind = getattr(config, "model_type", None)
    for family in families().values():
        if kind in family.model_types:
            return family.graph_config(config, split_embeds)
    named = ", ".join(getattr(config, "architectures", None) or [])
    raise NotImplementedError(f"config: model_type {kind!r}{f' ({named})' if named else ''} is not supported; "
                              f"supported architectures: {', '.join(supported_hf_architectures())}")
