"""Memory planner: the predicted peak memory per device of one edge-pruning step.

``plan(shape, settings)`` -> :class:`MemoryPlan` (bytes per component, the peak and the
phase that reaches it); ``edgeprune plan ...`` prints it (``add_arguments``/``run``).

One step (the Trainer's, ARCHITECTURE.md §2-3): the cached references (full logits and
the corrupted writer states; with ``cache_references=False`` the corrupted states are let
go after the loss, unless checkpointed layers re-read them), the edge-pruned forward with
sampled masks, KL over every position and the vocabulary, backward, AdamW on the
log_alphas. Notation: N = batch*seq tokens, D d_model, H heads of size dh, K KV heads, F
d_mlp, V vocab, L layers, W = 1 + L(H+1) writers (2 + ... with split embeddings), R = H +
2K attention readers (3H with k/v readers per query head, MIB's graph: ``kv_per_query_head``), b the model dtype's bytes, 4 for float32. The terms follow how
model.py, writers.py and ops/ allocate (checked against a saved-tensor audit of
tests/models/_tiny-like Llama models):

  weights          every parameter, b bytes (sharded: / n_gpus, plus the unsharded working
                   set FSDP gathers: two decoder layers and the root's embedding/unembedding,
                   a bound: the step gathers one of them at a time (sharding.py), a
                   reference pass through the HF forward the root and one or two layers)
  writer states    slot buffer [W, N, D] b (WriterStore.buffer); its gradient buffer, same
                   size (WriterStore.grad, allocated by the first read's backward); the
                   corrupted states [W, N, D] b (0 on the device with corrupted_on_cpu, one
                   slot [N, D] b in transit) and their running prefix sum [N, D] float32;
                   full logits (cached) and circuit logits [N, V] b each
  activations      what autograd keeps per layer (the frozen weights keep linears from saving
                   their inputs):
                     attention read  edge_mix output [R, N, D] kept by the norm: RMSNorm keeps
                                     it as float32 (4 R N D), LayerNorm in the model dtype
                                     (b R N D); rotated q, repeated k, v and the SDPA output
                                     (4 b N H dh). The projections keep nothing (frozen)
                     MLP read        the norm's input (4 or b N D); a gated MLP keeps its
                                     gate, up and activation outputs (3 b N F); GELU MLPs see
                                     ``_MLP_SAVED``
                     newer decoders  q/k norms' inputs, softcapped attention's [B, H, S, S]
                                     scores, post-norm shares (``layer_activations``)
                     resid_post      the final norm's input (4 or b N D)
                     loss            log-softmax of both logits, float32 (2 * 4 N V)
                   all L layers, or one layer being recomputed with checkpoint_layers
  masks/optimizer  M = edges + writers log_alphas, float32: parameter, gradient and AdamW's
                   two moments (16 M bytes)

The peak is the largest of these phases: the end of the forward (everything kept plus the
KL's float32 temporaries, 3 * 4 N V); the backward of the resid_post read; for every layer,
the backward of its MLP read, of its attention norm (``norm_bwd``: the norm's gradient
temporaries over [R, N, D]) and of its attention read. From the first read's backward on,
the gradient buffer exists; a read's mixing backward makes the clean-writer gradient
[n, N, D] (the reference backend float32 copies besides, see ``_mix_backward``). Host memory (corrupted states on the CPU) is reported, not counted.
Model shapes come from an HF config (a meta-device model gives the exact parameter count,
its adapter what the layers compute) or a known model's name (``KNOWN_MODELS``: Gemma-2-2B
/ 9B, Mistral-7B, Qwen3-8B, Phi-3-mini, OLMo-2-7B and MIB's GPT-2, Qwen2.5-0.5B and
Llama-3.1-8B, their config.json values written out).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BACKENDS = ("fused", "reference")
# Saved by the MLP beyond its norm, in units of b*N*F: gated (Llama, Qwen2) gate, up and
# activation outputs; GPT-2's tanh GELU input, tanh, 0.5x and 1+tanh; GPT-NeoX exact GELU input
_MLP_SAVED = {"gated": 3, "gelu_new": 4, "gelu": 1}
QK_NORMS = ("none", "head", "heads")


# Released models the planner knows by name (``--model gemma-2-2b``, or the hub id): the values
# of their config.json on the HF hub, written out (nothing is downloaded); what is not listed
# is the config class's default, as in those files. Their parameter counts come from a
# meta-device model, as for any config.
_GEMMA2 = dict(head_dim=256, vocab_size=256000, max_position_embeddings=8192, query_pre_attn_scalar=256,
               sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
               rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
KNOWN_MODELS: dict[str, tuple[str, dict]] = {
    "google/gemma-2-2b": ("gemma2", dict(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                         num_attention_heads=8, num_key_value_heads=4)),
    "google/gemma-2-9b": ("gemma2", dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                         num_attention_heads=16, num_key_value_heads=8)),
    "mistralai/Mistral-7B-v0.1": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False)),
    "Qwen/Qwen3-8B": ("qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, max_window_layers=36, tie_word_embeddings=False)),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)),
    "allenai/OLMo-2-1124-7B": ("olmo2", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=100352, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=False)),
    # MIB's other models (with Gemma-2-2B); Llama-3.1's rope scaling is left out: it changes no memory
    "openai-community/gpt2": ("gpt2", {}),
    "Qwen/Qwen2.5-0.5B": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=True)),
    "meta-llama/Llama-3.1-8B": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False)),
}
_SHORT_NAMES = {"mistral-7b": "mistralai/Mistral-7B-v0.1", "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
                "olmo-2-7b": "allenai/OLMo-2-1124-7B"}


def known_names() -> list[str]:
    return [hub.split("/")[-1].lower() for hub in KNOWN_MODELS] + list(_SHORT_NAMES)


def known_model(name: str) -> str | None:
    """The hub id of a known model from its id, the id's last part or a short name, in any case;
    None if unknown."""
    key = name.strip().lower()
    for hub in KNOWN_MODELS:
        if key in (hub.lower(), hub.split("/")[-1].lower()):
            return hub
    return _SHORT_NAMES.get(key)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model. n_params: exact count (None: the Llama formula)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_mlp: int
    vocab: int
    head_dim: int | None = None  # None: d_model / n_heads
    mlp: str = "gated"
    split_embeds: bool = False
    n_params: int | None = None
    name: str = "llama-shaped"
    # what the newer decoders add (models/: LayerSpec), read from the adapter in from_hf_config
    pre_norms: bool = True  # an RMSNorm/LayerNorm on each reader's input (False: OLMo-2)
    post_norms: bool = False  # RMSNorms on the attention and MLP outputs (Gemma-2, OLMo-2)
    qk_norm: str = "none"  # "head": q/k RMSNorms per head (Qwen3); "heads": over all heads (OLMo-2)
    attn_softcap: bool = False  # attention computed explicitly, its [B, H, S, S] scores kept (Gemma-2)
    kv_per_query_head: bool = False  # MIB's graph: a k and a v reader per query head (model.py)

    def __post_init__(self) -> None:
        for f in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_mlp", "vocab"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelShape.{f}: expected a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelShape.n_kv_heads: expected a divisor of n_heads ({self.n_heads}), "
                             f"got {self.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"ModelShape.head_dim: d_model {self.d_model} is not a multiple of n_heads "
                             f"{self.n_heads}; give head_dim")
        if self.mlp not in _MLP_SAVED:
            raise ValueError(f"ModelShape.mlp: expected one of {', '.join(_MLP_SAVED)}, got {self.mlp!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"ModelShape.qk_norm: expected one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def n_kv_readers(self) -> int:
        """k (and v) readers per layer: one per KV head, or per query head in MIB's graph."""
        return self.n_heads if self.kv_per_query_head else self.n_kv_heads

    @property
    def n_writers(self) -> int:
        return (2 if self.split_embeds else 1) + self.n_layers * (self.n_heads + 1)

    @property
    def n_edges(self) -> int:
        from .graph import n_edges_closed_form

        return n_edges_closed_form(self.n_layers, self.n_heads, self.n_kv_heads, split_embeds=self.split_embeds,
                                   kv_per_query_head=self.kv_per_query_head)

    def layer_params(self) -> int:
        D, H, K, dh, F = self.d_model, self.n_heads, self.n_kv_heads, self.dh, self.d_mlp
        return D * H * dh * 2 + 2 * D * K * dh + (3 if self.mlp == "gated" else 2) * D * F + 2 * D

    def params(self) -> int:
        if self.n_params is not None:
            return self.n_params
        return self.n_layers * self.layer_params() + 2 * self.vocab * self.d_model + self.d_model

    @classmethod
    def from_hf_config(cls, config, *, split_embeds: bool = False, kv_per_query_head: bool = False) -> ModelShape:
        """From a transformers config of a supported architecture; the parameter count is
        exact (the model is built on the meta device: no memory, no weights)."""
        import torch
        from torch import nn
        from transformers import AutoModelForCausalLM

        from .models import adapter_for, graph_config_from_hf

        g = graph_config_from_hf(config, split_embeds=split_embeds)  # ValueError/NotImplementedError if unsupported
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        spec = adapter_for(model).layers[0]  # what the family's layers compute, from its own adapter
        kind = config.model_type
        D = config.hidden_size if kind != "gpt2" else config.n_embd
        H = g.n_heads[0]
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * D
        mlp = {"gpt2": "gelu_new", "gpt_neox": "gelu"}.get(kind, "gated")
        head_dim = getattr(config, "head_dim", None) or D // H
        qk_norm = "none" if spec.q_norm is None else "heads" if spec.qk_norm_over_heads else "head"
        return cls(g.n_layers, H, g.n_kv_heads[0], D, d_mlp, config.vocab_size, head_dim, mlp, split_embeds,
                   n_params, getattr(config, "name_or_path", "") or kind,
                   pre_norms=not isinstance(spec.attn_norm, nn.Identity), post_norms=spec.attn_post_norm is not None,
                   qk_norm=qk_norm, attn_softcap=spec.softcap is not None, kv_per_query_head=kv_per_query_head)

    @classmethod
    def from_known(cls, name: str, **kwargs) -> ModelShape:
        """From a known model's name (``KNOWN_MODELS``; e.g. "gemma-2-2b", "Qwen/Qwen3-8B")."""
        from transformers import AutoConfig

        hub = known_model(name)
        if hub is None:
            raise ValueError(f"model: expected one of the known models ({', '.join(known_names())}), got {name!r}")
        model_type, values = KNOWN_MODELS[hub]
        config = AutoConfig.for_model(model_type, **values)
        config.name_or_path = hub
        return cls.from_hf_config(config, **kwargs)

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> ModelShape:
        """From a model directory written by save_pretrained, or its config.json."""
        from transformers import AutoConfig

        p = Path(path).expanduser()
        if p.is_file() and p.name.endswith(".json"):
            p = p.parent
        if not (p / "config.json").is_file():
            raise ValueError(f"model: expected a model directory with a config.json, a config.json, or a known "
                             f"model ({', '.join(known_names())}), got {str(path)!r}")
        return cls.from_hf_config(AutoConfig.from_pretrained(str(p), local_files_only=True), **kwargs)


@dataclass(frozen=True)
class PlanSettings:
    batch: int
    seq: int
    dtype: str = "bfloat16"
    n_gpus: int = 1
    checkpoint_layers: bool = False
    corrupted_on_cpu: bool = False
    backend: str = "fused"  # edge_mix backward: fused (Triton/C++) or reference (plain PyTorch)
    device_gb: float = 80.0
    cache_references: bool = True  # the Trainer's default: every batch's corrupted states stay alive

    def __post_init__(self) -> None:
        for f in ("batch", "seq", "n_gpus"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}: expected a positive int, got {v!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.device_gb > 0:
            raise ValueError(f"device_gb: expected a positive number of GB, got {self.device_gb!r}")


@dataclass
class MemoryPlan:
    shape: ModelShape
    settings: PlanSettings
    components: dict[str, int]  # bytes per device, what exists at the peak
    peak_bytes: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.settings.device_gb * GB

    def group_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, v in self.components.items():
            g = k.split(".")[0]
            out[g] = out.get(g, 0) + v
        return out

    def to_dict(self) -> dict:
        return {"shape": self.shape.__dict__, "settings": self.settings.__dict__, "components": self.components,
                "groups": self.group_totals(), "phases": self.phases, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase, "host_bytes": self.host_bytes, "fits": self.fits}

    def table(self) -> str:
        s, m = self.settings, self.shape
        lines = [f"{m.name}: {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} KV), d_model {m.d_model}, "
                 f"d_mlp {m.d_mlp}, vocab {m.vocab}; {m.params() / 1e9:.2f} B parameters, {m.n_writers} writers, "
                 f"{m.n_edges:,} edges{' (k/v readers per query head)' if m.kv_per_query_head else ''}",
                 f"batch {s.batch} x seq {s.seq}, {s.dtype}, {s.n_gpus} device(s)"
                 f"{', activation checkpointing' if s.checkpoint_layers else ''}"
                 f"{', corrupted states on the CPU' if s.corrupted_on_cpu else ''}"
                 f"{'' if s.cache_references else ', references not cached'}, {s.backend} edge_mix",
                 f"{'component (at the peak, per device)':<44}{'GB':>10}"]
        last = None
        for k, v in self.components.items():
            g = k.split(".")[0]
            if g != last:
                lines.append(f"  {g:<42}{self.group_totals()[g] / GB:>10.3f}")
                last = g
            lines.append(f"    {k.split('.', 1)[1]:<40}{v / GB:>10.3f}")
        lines.append(f"{'peak (' + self.peak_phase + ')':<44}{self.peak_bytes / GB:>10.3f}")
        if self.host_bytes:
            lines.append(f"{'host memory (corrupted states)':<44}{self.host_bytes / GB:>10.3f}")
        if s.n_gpus > 1:
            lines.append("note: weights sharded by FSDP over the devices, as after DataParallel.shard_weights; "
                         "without it they are replicated and the 1-device weight figure applies")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {s.device_gb:g} GB ({100 * self.peak_bytes / (s.device_gb * GB):.0f} %)")
        return "\n".join(lines)


def _mix_backward(n: int, R: int, ND: int, b: int, backend: str) -> int:
    """Temporaries of edge_mix's backward for R readers of n writers, beyond the incoming
    gradient [R, N, D]: none for the fused kernels, which add the clean-writer gradient into
    the slot buffer's (``grad_into``); the reference backend makes it, [n, N, D], recomputing
    the mix under autograd in float32 (the output [R, N, D] float32, and when b < 4 the float32
    copies of clean and corrupted and the float32 gradient before its cast, of which two are
    alive at once)."""
    if backend == "fused":
        return 0
    if b == 4:
        return n * ND * 4 + R * ND * 4
    return 2 * n * ND * 4 + n * ND * b + R * ND * 4  # measured: two [n, N, D] float32 alive at once


def layer_activations(shape: ModelShape, settings: PlanSettings) -> tuple[int, int]:
    """(attention, MLP) bytes autograd keeps per layer (see the module docstring), with what the
    newer decoders add: q/k norms' float32 inputs ([N, H + K, dh] per head; OLMo-2's over all
    heads [H, N, H*dh] + [K, N, K*dh]), an explicit softcapped attention's [B, H, S, S] tanh
    output (b), softmax (float32) and its cast (b, when b < 4), and a post-attention norm's
    head outputs [H, N, D] (b) with its float32 sum and scale [N, D] (a post-MLP norm: its
    float32 input [N, D])."""
    m, s = shape, settings
    b, N = DTYPE_BYTES[s.dtype], s.batch * s.seq
    D, H, K, dh, F = m.d_model, m.n_heads, m.n_kv_readers, m.dh, m.d_mlp
    ND, R = N * D, H + 2 * K
    nb = (4 if m.mlp == "gated" else b) if m.pre_norms else 0
    attn = nb * R * ND + 4 * b * N * H * dh
    attn += {"none": 0, "head": 4 * N * dh * (H + K), "heads": 4 * N * dh * (H * H + K * K)}[m.qk_norm]
    if m.attn_softcap:
        attn += (b + 4 + (b if b < 4 else 0)) * s.batch * H * s.seq ** 2
    mlp = nb * ND + _MLP_SAVED[m.mlp] * b * N * F
    if m.post_norms:
        attn += b * H * ND + 2 * 4 * ND
        mlp += 4 * ND
    return attn, mlp


def plan(shape: ModelShape, settings: PlanSettings) -> MemoryPlan:
    """The predicted peak memory per device of one step (see the module docstring)."""
    m, s = shape, settings
    b, N = DTYPE_BYTES[s.dtype], s.batch * s.seq
    D, H, dh, V, L, W = m.d_model, m.n_heads, m.dh, m.vocab, m.n_layers, m.n_writers
    ND, R, E = N * D, m.n_heads + 2 * m.n_kv_readers, 2 if m.split_embeds else 1
    n_masks = m.n_edges + W

    weights = {"weights.parameters (sharded)" if s.n_gpus > 1 else "weights.parameters": -(-m.params() * b // s.n_gpus)}
    if s.n_gpus > 1:  # FSDP: the gathered current + prefetched layer, and the root (embeddings, lm_head)
        weights["weights.gathered (FSDP)"] = (2 * m.layer_params() + 2 * V * D) * b
    corrupted = 0 if s.corrupted_on_cpu else W * ND * b
    # uncached and not recomputed, the corrupted states are let go once the loss is computed:
    # then only the forward's end counts them
    corrupted_in_backward = s.cache_references or s.checkpoint_layers
    states = {"writer_states.slot buffer": W * ND * b,
              "writer_states.corrupted": corrupted if corrupted_in_backward else 0,
              "writer_states.corrupted prefix sum": 4 * ND,
              "writer_states.full logits": N * V * b,
              "writer_states.circuit logits": N * V * b}
    masks = {"masks_optimizer.log_alpha + grad + AdamW": 16 * n_masks}
    fixed = sum(weights.values()) + sum(states.values()) + sum(masks.values())
    grad_buffer = {"writer_states.gradient buffer": W * ND * b}

    nb = 4 if m.mlp == "gated" else b  # RMSNorm (Llama, Qwen2) keeps its input in float32, LayerNorm as is
    attn, mlp = layer_activations(m, s)
    layer, final, ckpt = attn + mlp, nb * ND, s.checkpoint_layers
    # the attention norm's backward over [R, N, D]: RMSNorm's autograd in float32 holds the output
    # gradient, the gradient through x * rsqrt, x * grad for rsqrt's gradient and pow's 2x * grad at once;
    # LayerNorm's fused backward its input gradient and one temporary
    # (OLMo-2 has no such norm; its widest RMSNorm is q_norm's over [H, N, H*dh], counted alike)
    normed = R * ND if m.pre_norms else (N * dh * (H * H + m.n_kv_readers ** 2) if m.qk_norm == "heads" else 0)
    norm_bwd = 4 * normed * 4 + (normed * b if b < 4 else 0) if m.mlp == "gated" else 2 * normed * b

    slot_copy = ND * b if s.corrupted_on_cpu else 0  # corrupted states on the CPU come a slot at a time

    # Each candidate phase: (components alive beyond `fixed`), the peak is the largest
    loss = 2 * 4 * N * V
    forward_only = {} if corrupted_in_backward else {"writer_states.corrupted": corrupted}
    candidates = {"forward end": {**forward_only,
                                  "activations.layers kept": 0 if ckpt else L * layer,
                                  "activations.resid_post": 0 if ckpt else final,
                                  "activations.loss (log-probs)": loss,
                                  "activations.loss temporaries": 3 * 4 * N * V}}  # log p, exp(log p), difference
    candidates["backward of resid_post"] = {**grad_buffer, "activations.layers kept": 0 if ckpt else L * layer,
                                            "activations.resid_post": final,
                                            "activations.mixing backward": ND * b + slot_copy
                                            + _mix_backward(W, 1, ND, b, s.backend)}
    for layer_i in range(L):
        W_a = E + layer_i * (H + 1)  # writers read by this layer's attention, its MLP: + its heads
        # plain: the layers below it are kept; checkpointed: only this one, recomputed
        below = {"activations.layers kept": 0 if ckpt else layer_i * layer}
        candidates[f"backward of layer {layer_i}'s MLP read"] = {
            **grad_buffer, **below, "activations.this layer": layer,
            "activations.mixing backward": ND * b + slot_copy + _mix_backward(W_a + H, 1, ND, b, s.backend)}
        candidates[f"backward of layer {layer_i}'s attention norm"] = {
            **grad_buffer, **below, "activations.this layer": layer, "activations.norm backward": norm_bwd}
        candidates[f"backward of layer {layer_i}'s attention read"] = {
            **grad_buffer, **below,
            "activations.mixing backward": R * ND * b + slot_copy + _mix_backward(W_a, R, ND, b, s.backend)}
    phases = {k: fixed + sum(v.values()) for k, v in candidates.items()}
    peak_phase = max(phases, key=phases.get)
    components = {**weights, **states, **grad_buffer, **masks}
    components["writer_states.gradient buffer"] = 0
    components.update(candidates[peak_phase])
    order = ("weights", "writer_states", "activations", "masks_optimizer")
    components = {k: v for g in order for k, v in components.items() if k.startswith(g + ".")}
    host = W * ND * b if s.corrupted_on_cpu else 0
    return MemoryPlan(m, s, components, phases[peak_phase], peak_phase, phases, host)


# ---- command line (wired as `edgeprune plan` by commands/plan.py) ---------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``edgeprune plan``: a model (HF directory / config.json, or shape
    arguments), batch, seq, dtype, number of GPUs and the options."""
    src = parser.add_argument_group("model (a config, or its shape)")
    src.add_argument("--model", help="model directory written by save_pretrained, its config.json, or a known model: "
                     + ", ".join(known_names()))
    for name, help_ in (("layers", "number of layers"), ("heads", "attention heads"),
                        ("kv-heads", "KV heads (default: = heads)"), ("d-model", "hidden size"),
                        ("d-mlp", "MLP size (default: 4 d_model)"), ("vocab", "vocabulary size (default 32000)")):
        src.add_argument(f"--{name}", type=int, help=help_)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--gpus", type=int, default=1, help="devices the weights are sharded over (FSDP)")
    parser.add_argument("--checkpoint-layers", action="store_true", help="per-layer activation checkpointing")
    parser.add_argument("--corrupted-on-cpu", action="store_true", help="keep corrupted writer states in host memory")
    parser.add_argument("--backend", default="fused", choices=BACKENDS, help="edge_mix backend (default: fused)")
    parser.add_argument("--device-gb", type=float, default=80.0, help="device memory in GB (default 80)")
    parser.add_argument("--no-cache-references", dest="cache_references", action="store_false",
                        help="plan for TrainConfig(cache_references=False): corrupted states freed before backward")
    parser.add_argument("--kv-per-query-head", action="store_true",
                        help="MIB's graph: a k and a v reader per query head (grouped-query models)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    return replace(_shape(args), kv_per_query_head=getattr(args, "kv_per_query_head", False))


def _shape(args: argparse.Namespace) -> ModelShape:
    if args.model:  # a folder or config.json first: a local folder may share a known model's name
        path = Path(args.model).expanduser()
        if not path.exists() and known_model(args.model) is not None:
            return ModelShape.from_known(args.model)
        return ModelShape.from_path(args.model)
    missing = [f"--{n.replace('_', '-')}" for n in ("layers", "heads", "d_model") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"model: expected --model PATH or the shape ({', '.join(missing)} missing)")
    d_mlp = args.d_mlp or 4 * args.d_model
    return ModelShape(args.layers, args.heads, args.kv_heads or args.heads, args.d_model, d_mlp,
                      args.vocab or 32000)


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 if it fits, 1 if not."""
    p = plan(shape_from_args(args), PlanSettings(args.batch, args.seq, args.dtype, args.gpus, args.checkpoint_layers,
                                                 args.corrupted_on_cpu, args.backend, args.device_gb,
                                                 args.cache_references))
    print(json.dumps(p.to_dict(), indent=1) if args.json else p.table())
    return 0 if p.fits else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="edgeprune plan", description=__doc__.split("\n")[0])
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
