"""Tiny random-weight models of the supported HF architectures (fp32, eval mode): 3 layers
(2 for the newer families), d_model 32, 4 heads, 2 KV heads where the family has GQA; sliding
windows of 4 (< the tests' 9 tokens), softcaps small enough to bend the tiny logits."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB, CTX = 61, 24
NEW_ARCHS = ("gemma", "gemma2", "mistral", "qwen3", "phi3", "olmo2")
ARCHS = ("gpt2", "llama", "neox", "neox_seq", "qwen2", *NEW_ARCHS)
_LLAMA_LIKE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                   intermediate_size=48, max_position_embeddings=CTX)
# family: (HF class prefix, what differs from _LLAMA_LIKE)
_NEW = {
    "gemma": ("Gemma", dict(head_dim=16, num_key_value_heads=1)),  # head_dim != d_model / H, multi-query
    "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                              query_pre_attn_scalar=10)),
    "mistral": ("Mistral", dict(sliding_window=4)),
    "qwen3": ("Qwen3", dict(head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "phi3": ("Phi3", dict(sliding_window=4, partial_rotary_factor=0.5)),
    "olmo2": ("Olmo2", {}),
}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.1)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=CTX, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":  # grouped-query attention: 4 query heads, 2 KV heads
        cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                          intermediate_size=48, max_position_embeddings=CTX, **common)
        model = LlamaForCausalLM(cfg)
    elif arch in ("neox", "neox_seq"):  # Pythia-like: partial rotary, parallel residual (or not)
        cfg = GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                            max_position_embeddings=CTX, rotary_pct=0.25, use_parallel_residual=arch == "neox",
                            **common)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                          intermediate_size=48, max_position_embeddings=CTX, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch in _NEW:
        prefix, extra = _NEW[arch]
        cfg = getattr(transformers, f"{prefix}Config")(**(_LLAMA_LIKE | extra), **common)
        if arch == "gemma2":  # eager, as HF advises: transformers 5.17 defaults to SDPA, which drops the attention softcap
            cfg._attn_implementation = "eager"
        model = getattr(transformers, f"{prefix}ForCausalLM")(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random biases and norm weights, so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()
