"""Per-architecture adapters: where an HF causal LM keeps the parts the edge-pruned forward needs.

An :class:`Adapter` is declarative: it names the model's own modules and gives per-head
*views* of its weights; it holds no maths (that lives in ``model.py`` and ``writers.py``).
``adapter_for(model)`` picks the builder by the model's class:

    GPT2LMHeadModel      learned absolute positions (split_embeds allowed), fused Conv1D c_attn
    LlamaForCausalLM     rotary, RMSNorm, grouped-query attention (one k/v reader per KV head)
    GPTNeoXForCausalLM   partial rotary, per-head interleaved query_key_value, parallel
                         attention+MLP when ``use_parallel_residual``
    Qwen2ForCausalLM     as Llama, with q/k/v biases (sliding-window attention unsupported)

Adding an architecture (e.g. the tracr loader's ``TracrTransformer``) means writing one
function ``model -> Adapter`` and registering it in ``ADAPTERS``; the fields are:

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

A complete non-HF example (the tracr ``TracrTransformer``: identity norms, causal=False,
its own reference forward) is ``tracr.tracr_adapter``, registered below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .graph import GraphConfig


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
    where the model stores them so (GPT-2's fused c_attn; dh == dv), so that the attention
    readers' projections are one batched product (no split, no concatenated gradient)."""

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
def _linear_heads(linear: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear D -> n*d (weight [n*d, D]) as W [n, D, d] and b [n, d]."""
    w = linear.weight
    W = w.view(n, w.shape[0] // n, w.shape[1]).transpose(1, 2)
    b = None if linear.bias is None else linear.bias.view(n, -1)
    return W, b


def _linear_out_heads(linear: nn.Linear, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear n*d -> D (weight [D, n*d]) as W_O [n, d, D] and b_O [D]."""
    w = linear.weight
    return w.view(w.shape[0], n, w.shape[1] // n).permute(1, 2, 0), linear.bias


def _hf_forward(model: nn.Module) -> Callable:
    def forward(input_ids, attention_mask, position_ids):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits
    return forward


def _hf_body_forward(model: nn.Module) -> Callable:
    """The decoder without the LM head (its [B, S, V] product is the largest of a small model's forward)."""
    def forward(input_ids, attention_mask, position_ids):
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
    return forward


def _rotary_fn(attn_module: nn.Module) -> Callable:
    import sys

    return sys.modules[type(attn_module).__module__].apply_rotary_pos_emb


# ---- the four architectures --------------------------------------------------------------------
def _gpt2_layer(model: nn.Module, i: int) -> LayerSpec:
    block, H, D = model.transformer.h[i], model.config.n_head, model.config.n_embd
    at = block.attn
    w, b = at.c_attn.weight, at.c_attn.bias  # Conv1D: x @ w + b, w [D, 3D]; q | k | v along the output
    heads = [w[:, j * D:(j + 1) * D].view(D, H, D // H).transpose(0, 1) for j in range(3)]
    biases = [b[j * D:(j + 1) * D].view(H, D // H) for j in range(3)]
    return LayerSpec(
        attn_norm=block.ln_1, mlp_norm=block.ln_2,
        W_Q=heads[0], b_Q=biases[0], W_K=heads[1], b_K=biases[1], W_V=heads[2], b_V=biases[2],
        W_O=at.c_proj.weight.view(H, D // H, D), b_O=at.c_proj.bias,
        mlp=block.mlp, scale=float(at.scaling), o_proj=at.c_proj,
        W_QKV=w.view(D, 3 * H, D // H).transpose(0, 1), b_QKV=b.view(3 * H, D // H), block=block)


def gpt2_adapter(model: nn.Module) -> Adapter:
    cfg = model.config
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, flag, False):
            raise NotImplementedError(f"GPT2LMHeadModel with config.{flag}=True is not supported")
    tr = model.transformer
    layer_fn = functools.partial(_gpt2_layer, model)
    return Adapter(
        architecture="GPT2LMHeadModel", model=model, layers=tuple(map(layer_fn, range(len(tr.h)))),
        d_model=cfg.n_embd, n_ctx=cfg.n_positions, embed_tokens=tr.wte, embed_positions=tr.wpe, rotary=None,
        apply_rotary=None, final_norm=tr.ln_f, unembed=model.lm_head, full_forward=_hf_forward(model),
        body_forward=_hf_body_forward(model), layer_fn=layer_fn)


def _llama_layer(model: nn.Module, i: int) -> LayerSpec:
    cfg, layer = model.config, model.model.layers[i]
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    at = layer.self_attn
    (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = (_linear_heads(p, n) for p, n in
                                          ((at.q_proj, H), (at.k_proj, K), (at.v_proj, K)))
    W_O, b_O = _linear_out_heads(at.o_proj, H)
    return LayerSpec(
        attn_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm,
        W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V, W_O=W_O, b_O=b_O,
        mlp=layer.mlp, scale=float(at.scaling), o_proj=at.o_proj, block=layer)


def _llama_like(model: nn.Module, architecture: str) -> Adapter:
    """Llama and Qwen2 (same layout; Qwen2 has q/k/v biases, Llama has config.attention_bias)."""
    cfg, base = model.config, model.model
    layer_fn = functools.partial(_llama_layer, model)
    return Adapter(
        architecture=architecture, model=model, layers=tuple(map(layer_fn, range(len(base.layers)))),
        d_model=cfg.hidden_size, n_ctx=cfg.max_position_embeddings, embed_tokens=base.embed_tokens,
        embed_positions=None, rotary=base.rotary_emb, apply_rotary=_rotary_fn(base.layers[0].self_attn),
        final_norm=base.norm, unembed=model.lm_head, full_forward=_hf_forward(model),
        body_forward=_hf_body_forward(model), layer_fn=layer_fn)


def llama_adapter(model: nn.Module) -> Adapter:
    return _llama_like(model, "LlamaForCausalLM")


def qwen2_adapter(model: nn.Module) -> Adapter:
    cfg = model.config
    sliding = [i for i, t in enumerate(getattr(cfg, "layer_types", None) or []) if t == "sliding_attention"]
    if getattr(cfg, "use_sliding_window", False) or sliding:
        raise NotImplementedError(f"Qwen2ForCausalLM with sliding-window attention is not supported "
                                  f"(config.use_sliding_window={cfg.use_sliding_window}, sliding layers {sliding})")
    return _llama_like(model, "Qwen2ForCausalLM")


def _gpt_neox_layer(model: nn.Module, i: int) -> LayerSpec:
    cfg, layer = model.config, model.gpt_neox.layers[i]
    H, D = cfg.num_attention_heads, cfg.hidden_size
    dh = D // H
    at = layer.attention
    # query_key_value: D -> 3D with rows per head [q_h (dh) | k_h (dh) | v_h (dh)] (HF views [.., H, 3*dh])
    w = at.query_key_value.weight.view(H, 3, dh, D).transpose(2, 3)  # [H, 3, D, dh]
    b = None if at.query_key_value.bias is None else at.query_key_value.bias.view(H, 3, dh)
    W_O, b_O = _linear_out_heads(at.dense, H)
    return LayerSpec(
        attn_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm,
        W_Q=w[:, 0], b_Q=None if b is None else b[:, 0], W_K=w[:, 1], b_K=None if b is None else b[:, 1],
        W_V=w[:, 2], b_V=None if b is None else b[:, 2], W_O=W_O, b_O=b_O,
        mlp=layer.mlp, scale=float(at.scaling), o_proj=at.dense, block=layer)


def gpt_neox_adapter(model: nn.Module) -> Adapter:
    cfg, base = model.config, model.gpt_neox
    layer_fn = functools.partial(_gpt_neox_layer, model)
    return Adapter(
        architecture="GPTNeoXForCausalLM", model=model, layers=tuple(map(layer_fn, range(len(base.layers)))),
        d_model=cfg.hidden_size, n_ctx=cfg.max_position_embeddings, embed_tokens=base.embed_in,
        embed_positions=None, rotary=base.rotary_emb, apply_rotary=_rotary_fn(base.layers[0].attention),
        final_norm=base.final_layer_norm, unembed=model.lm_head, full_forward=_hf_forward(model),
        body_forward=_hf_body_forward(model), parallel_mlp=bool(cfg.use_parallel_residual), layer_fn=layer_fn)


def _tracr_adapter(model: nn.Module) -> Adapter:
    from .tracr import tracr_adapter  # imported here: tracr.py imports this module

    return tracr_adapter(model)


ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {
    "GPT2LMHeadModel": gpt2_adapter,
    "LlamaForCausalLM": llama_adapter,
    "GPTNeoXForCausalLM": gpt_neox_adapter,
    "Qwen2ForCausalLM": qwen2_adapter,
    "TracrTransformer": _tracr_adapter,
}


def graph_config_from_hf(config, *, split_embeds: bool = False) -> GraphConfig:
    """The graph of an HF config of a supported architecture, without building weights
    (e.g. ``Graph(graph_config_from_hf(GPT2Config())).n_edges == 32491``)."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    kind = getattr(config, "model_type", None)
    if kind == "gpt2" or arch == "GPT2LMHeadModel":
        return GraphConfig(config.n_layer, config.n_head, None, split_embeds, False)
    if kind in ("llama", "qwen2", "gpt_neox"):
        if split_embeds:
            raise ValueError(f"split_embeds: {kind} models use rotary positions and have one 'embeds' writer; "
                             f"expected split_embeds=False, got True")
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        parallel = kind == "gpt_neox" and bool(config.use_parallel_residual)
        return GraphConfig(config.num_hidden_layers, config.num_attention_heads, kv, False, parallel)
    raise NotImplementedError(f"config: model_type {kind!r} is not supported; supported architectures: "
                              f"{', '.join(ADAPTERS)}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model`` (by its class or a base class); NotImplementedError listing
    the supported architectures otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    raise NotImplementedError(f"model: {type(model).__name__} is not supported; supported architectures: "
                              f"{', '.join(ADAPTERS)}")
