"""What every model family shares: the declarative :class:`Adapter` and :class:`LayerSpec`,
the :class:`Family` record each family module exports, and helpers for the usual HF
weight layouts.

An :class:`Adapter` names the model's own modules and gives per-head *views* of its
weights; it holds no maths (that lives in ``model.py`` and ``writers.py``). One module per
model family (``models/gpt2.py``, ``models/llama.py``, ...) builds it; ``models/__init__``
finds the families and picks one by the model's class (``adapter_for``) or its config
(``graph_config_from_hf``). The fields:

    architecture    a name for messages
    model           the wrapped module (kept so its parameters are frozen and its forward
                    gives the full model's logits)
    layers          one :class:`LayerSpec` per layer (below)
    d_model, n_ctx  residual width; longest sequence the model accepts
    embed_tokens    input_ids [B, S] -> [B, S, D]
    embed_positions position_ids [1 or B, S] -> [1 or B, S, D], or None when positions enter
                    only through rotary (then the graph has one ``embeds`` writer and
                    split_embeds is a ValueError)
    rotary          (x, position_ids) -> (cos, sin), the model's rotary module, or None
    apply_rotary    (q [B,H,S,dh], k [B,K,S,dh], cos, sin) -> (q, k), the model's function
    final_norm      module applied to resid_post's input (nn.Identity() if none)
    unembed         module [.., D] -> [.., n_out] (logits, or tracr's numeric/categorical outputs)
    final_softcap   c: the logits are c * tanh(unembed(..) / c) (Gemma-2's final-logit
                    softcapping), or None
    causal          False for bidirectional attention (tracr)
    parallel_mlp    True when the MLP reads the layer's input, not the attention's output
    full_forward    (input_ids, attention_mask, position_ids) -> logits of the unmodified model
    body_forward    optional (input_ids, attention_mask, position_ids) -> anything: every layer of
                    the unmodified model without the unembedding (HF: ``model.base_model``),
                    so that capturing writer states alone does not pay for the logits; None:
                    ``full_forward`` is used
    reference_fn    optional (input_ids, attention_mask, position_ids, graph) ->
                    (logits, writer states [W, B, S, D]); when None the states are captured
                    with hooks on ``LayerSpec.o_proj`` (pre-hook: z) and ``LayerSpec.mlp``
    layer_fn        optional i -> layer i's LayerSpec, built from the model's parameters as
                    they are now (``layers`` is ``layer_fn`` over every layer); with it and
                    ``LayerSpec.block`` the weights can be sharded (sharding.py rebuilds one
                    layer's views while FSDP has gathered that layer alone). None: no sharding

Adding an architecture is one new module in ``models/`` that exports ``FAMILY``, a
:class:`Family` (see ``models/llama.py`` for an HF family, ``models/tracr.py`` for a
non-HF model with identity norms, bidirectional attention and its own reference forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..graph import GraphConfig


@dataclass(frozen=True, eq=False)
class RMSNorm:
    """An RMSNorm as data: y = (offset + weight) * x / sqrt(mean(x^2) + eps) over the last
    dimension. weight [D] is a view of the model's parameter; offset 1 for Gemma's
    ``1 + weight`` gain, 0 otherwise. writers.rms_norm computes it (in float32, float64 for
    float64 models); the writers of a post-normed attention are its per-head shares."""

    weight: torch.Tensor
    eps: float
    offset: float = 0.0


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One layer. Weights are views of the model's parameters in the ``x @ W`` convention
    (no copies; H query heads, K KV heads, D model width, dh/dv head widths)::

        W_Q [H, D, dh]  b_Q [H, dh] or None        W_O [H, dv, D]  b_O [D] or None
        W_K [K, D, dh]  b_K [K, dh] or None        (the writer a{l}.h{h} is z_h W_O[h] + b_O/H)
        W_V [K, D, dv]  b_V [K, dv] or None

    attn_norm / mlp_norm: applied to each attention reader's / the MLP reader's input
    (nn.Identity() for none); mlp: [.., D] -> [.., D]; scale: softmax(scale * q k^T);
    o_proj: the module whose input is z [B, S, H*dv] (heads concatenated), for the
    reference capture (None when the adapter supplies ``reference_fn``).
    block: the module that holds all of the layer's parameters (the decoder layer; the unit
    FSDP shards, sharding.py), or None.
    W_QKV [H + 2K, D, dh], b_QKV [H + 2K, dh] or None: optional, W_Q | W_K | W_V as one view
    where the model stores them so (GPT-2's c_attn, Phi-3's qkv_proj; dh == dv), so that the
    attention readers' projections are one batched product (no split, no concatenated gradient).

    Optional parts of the newer decoders (all None / False: the GPT-2 / Llama block):
    q_norm / k_norm: modules applied to the projected queries / keys before rotary: per head
    over dh (Qwen3: [.., dh] -> [.., dh]), or, with ``qk_norm_over_heads``, over the whole
    projection of all heads (OLMo-2: [.., H*dh] -> [.., H*dh], K*dh for keys), so that each
    reader projects its own input with every head's weights and keeps its head's slice.
    attn_post_norm / mlp_post_norm: an :class:`RMSNorm` the attention output o = sum_h o_h /
    the MLP output goes through before the residual (Gemma-2, OLMo-2); the writer a{l}.h{h}
    is then head h's share g * o_h / rms(o), m{l} the normed MLP output (writers.py).
    softcap: attention logits become c * tanh(scores / c) (Gemma-2), or None.
    sliding_window: w, keys more than w - 1 positions before the query are masked (as HF's
    sliding_window_overlay: key j is seen by query i iff i - w < j <= i), or None."""

    attn_norm: nn.Module
    mlp_norm: nn.Module
    W_Q: torch.Tensor
    b_Q: torch.Tensor | None
    W_K: torch.Tensor
    b_K: torch.Tensor | None
    W_V: torch.Tensor
    b_V: torch.Tensor | None
    W_O: torch.Tensor
    b_O: torch.Tensor | None
    mlp: nn.Module
    scale: float
    o_proj: nn.Module | None
    W_QKV: torch.Tensor | None = None
    b_QKV: torch.Tensor | None = None
    block: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    qk_norm_over_heads: bool = False
    attn_post_norm: RMSNorm | None = None
    mlp_post_norm: RMSNorm | None = None
    softcap: float | None = None
    sliding_window: int | None = None

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]


@dataclass(frozen=True, eq=False)
class Adapter:
    """See the module docstring for every field."""

    architecture: str
    model: nn.Module
    layers: tuple[LayerSpec, ...]
    d_model: int
    n_ctx: int
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]
    embed_positions: Callable[[torch.Tensor], torch.Tensor] | None
    rotary: Callable | None
    apply_rotary: Callable | None
    final_norm: nn.Module
    unembed: nn.Module
    full_forward: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
    causal: bool = True
    parallel_mlp: bool = False
    final_softcap: float | None = None
    reference_fn: Callable | None = None
    body_forward: Callable | None = None
    layer_fn: Callable[[int], LayerSpec] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].W_Q.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].W_Q.device


# ---- helpers: per-head views of the usual weight layouts --------------------------------------
def linear_heads(linear: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear D -> n*d (weight [n*d, D]) as W [n, D, d] and b [n, d]."""
    w = linear.weight
    W = w.view(n, w.shape[0] // n, w.shape[1]).transpose(1, 2)
    b = None if linear.bias is None else linear.bias.view(n, -1)
    return W, b


def linear_out_heads(linear: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear n*d -> D (weight [D, n*d]) as W_O [n, d, D] and b_O [D]."""
    w = linear.weight
    return w.view(w.shape[0], n, w.shape[1] // n).permute(1, 2, 0), linear.bias


def hf_forward(model: nn.Module) -> Callable:
    def forward(input_ids, attention_mask, position_ids):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits
    return forward


def hf_body_forward(model: nn.Module) -> Callable:
    """The decoder without the LM head (its [B, S, V] product is the largest of a small model's forward)."""
    def forward(input_ids, attention_mask, position_ids):
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
    return forward


def rotary_fn(attn_module: nn.Module) -> Callable:
    import sys

    return sys.modules[type(attn_module).__module__].apply_rotary_pos_emb


@dataclass(frozen=True)
class Family:
    """One model family: what ``models/__init__`` needs to find and build its adapter.

    classes        model class names it serves (matched along the model's MRO)
    adapter        model -> Adapter (NotImplementedError for a configuration it cannot serve)
    model_types    HF ``config.model_type`` values it reads without weights (empty: not an HF family)
    graph_config   (config, split_embeds) -> GraphConfig, the graph of a config without weights
    """

    classes: tuple[str, ...]
    adapter: Callable[[nn.Module], Adapter]
    model_types: tuple[str, ...] = ()
    graph_config: Callable[..., GraphConfig] | None = None


def rotary_graph_config(config, split_embeds: bool, *, parallel_mlp: bool = False) -> GraphConfig:
    """The graph of a decoder with rotary positions (one ``embeds`` writer) from its HF config."""
    if split_embeds:
        raise ValueError(f"split_embeds: {config.model_type} models use rotary positions and have one 'embeds' "
                         f"writer; expected split_embeds=False, got True")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return GraphConfig(config.num_hidden_layers, config.num_attention_heads, kv, False, parallel_mlp)



def rms_norm_of(module: nn.Module, offset: float = 0.0) -> RMSNorm:
    """An HF RMSNorm module as :class:`RMSNorm` (its eps is ``eps`` or ``variance_epsilon``)."""
    eps = getattr(module, "eps", None)
    return RMSNorm(module.weight, float(module.variance_epsilon if eps is None else eps), offset)
