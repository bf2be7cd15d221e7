"""A slow, independent reference of the edge-pruned forward, for tests.

Written from the maths (ARCHITECTURE.md §1-2), not from the package: every reader's input
is an explicit Python sum over its upstream writers of the clean output (edge kept) or the
ablated one (edge removed: the corrupted run's output, or 0). It uses the HF model's own
full projections (sliced per head afterwards), its norm modules on the readers' inputs and
on q/k (OLMo-2's over the whole projection, then sliced), its rotary function and eager
attention written out here (softcap, sliding window, padding). What the HF model does beyond
Llama is written from the maths here too: Gemma's sqrt(d_model) embedding scale, the
post-norm head writers g * o_h / rms(o) and normed MLP writers (Gemma-2, OLMo-2), and the
final-logit softcap.
"""

from __future__ import annotations

import math
import sys

import torch

LLAMA_LAYOUT = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "GemmaForCausalLM",
                "Gemma2ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM")


def parts(model):
    """(architecture, embeddings fn, layers, final norm, lm_head, rotary module or None)."""
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        t = model.transformer
        return "gpt2", t, t.h, t.ln_f, None
    if name in LLAMA_LAYOUT:
        b = model.model
        return "llama", b, b.layers, b.norm, b.rotary_emb
    if name == "GPTNeoXForCausalLM":
        b = model.gpt_neox
        return "neox", b, b.layers, b.final_layer_norm, b.rotary_emb
    raise ValueError(name)


def names(model, split_embeds=False, kv_per_query_head=False):
    cfg = model.config
    L = cfg.num_hidden_layers
    H = cfg.num_attention_heads
    K = H if kv_per_query_head else getattr(cfg, "num_key_value_heads", None) or H
    writers = ["tok_embeds", "pos_embeds"] if split_embeds else ["embeds"]
    layers = []
    for layer in range(L):
        kv = "h" if K == H else "g"
        q = [f"a{layer}.h{h}.q" for h in range(H)]
        k = [f"a{layer}.{kv}{g}.k" for g in range(K)]
        v = [f"a{layer}.{kv}{g}.v" for g in range(K)]
        layers.append((q, k, v, len(writers)))
        writers = writers + [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]
    return writers, layers


def rms_normed(x, gain, eps):
    """gain * x / sqrt(mean(x^2) + eps) over the last dimension."""
    return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _eps(norm):
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


def _llama_layout(model, blk):
    """What a Llama-layout layer reads and writes: (norm1, norm2, proj, o_w, o_b, scale, softcap,
    window, attn post-norm (gain, eps) or None, mlp post-norm or None)."""
    cfg, name, at = model.config, type(model).__name__, blk.self_attn
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = at.head_dim
    identity = lambda x: x  # noqa: E731
    norm1 = identity if name == "Olmo2ForCausalLM" else blk.input_layernorm
    norm2 = {"Gemma2ForCausalLM": getattr(blk, "pre_feedforward_layernorm", None),
             "Olmo2ForCausalLM": identity}.get(name, blk.post_attention_layernorm)

    def proj(x, which, i):
        if name == "Phi3ForCausalLM":  # qkv_proj output [q (H*dh) | k (K*dh) | v (K*dh)]
            start = (0, H * dh, (H + K) * dh)[which]
            return at.qkv_proj(x)[..., start + i * dh:start + (i + 1) * dh]
        y = (at.q_proj, at.k_proj, at.v_proj)[which](x)
        norm = (getattr(at, "q_norm", None), getattr(at, "k_norm", None), None)[which]
        if norm is not None and name == "Olmo2ForCausalLM":  # over every head's projection, then sliced
            return norm(y)[..., i * dh:(i + 1) * dh]
        y = y[..., i * dh:(i + 1) * dh]
        return y if norm is None else norm(y)  # Qwen3: each head's q/k over dh

    def o_w(h):
        return at.o_proj.weight[:, h * dh:(h + 1) * dh].T

    softcap = getattr(cfg, "attn_logit_softcapping", None) if name == "Gemma2ForCausalLM" else None
    types = getattr(cfg, "layer_types", None)
    if name in ("MistralForCausalLM", "Phi3ForCausalLM"):
        window = cfg.sliding_window
    elif types is not None and types[at.layer_idx] == "sliding_attention":
        window = cfg.sliding_window
    else:
        window = None
    post = None
    if name in ("Gemma2ForCausalLM", "Olmo2ForCausalLM"):
        offset = 1.0 if name == "Gemma2ForCausalLM" else 0.0
        post = [(offset + n.weight, _eps(n)) for n in (blk.post_attention_layernorm, blk.post_feedforward_layernorm)]
    return (norm1, norm2, proj, o_w, at.o_proj.bias, at.scaling, softcap, window, *(post or (None, None)))


def slow_forward(model, ids, kept, ablated=None, split_embeds=False, attention_mask=None, kv_per_query_head=False,
                 post_norm="writer", edge_z=None, directions=None, replace=None):
    """logits and {writer: output}; kept: set of (writer, reader), or {(writer, reader): mask value
    z} (soft masks, z * clean + (1 - z) * ablated; absent: 0); ablated: {writer: tensor} or None (zero).
    attention_mask [B, S] (1 = token): padded keys are masked; positions stay arange(S) as in HF;
    a query that sees no key gets z = 0. kv_per_query_head: every query head has its own k/v
    reader, projected with its KV group's weights. post_norm="reader" (models with a
    post-attention norm): head h's output is the pre-norm z_h W_O[h] and every reader gets,
    for each upstream post-normed layer, RMSNorm(b_O + sum_h of that layer's heads, each its
    clean output if the edge is kept, else its ablated one (0 under zero ablation)), MIB /
    EAP-IG's evaluate_graph on TransformerLens.
    Attribution (``edge_z`` given, ``kept`` ignored): every edge is kept and moved along a direction,
    x_r = sum_w y_w + (edge_z[(w, r)] - 1) * directions[w], one scalar per edge (at 1: the
    full model; d/dz = <dM/dx_r, directions[w]>). ``replace``: {writer: tensor} put in place
    of that writer's output once computed (interpolated writers)."""
    arch, base, blocks, final_norm, rotary = parts(model)
    cfg = model.config
    B, S = ids.shape
    H = cfg.num_attention_heads
    K = getattr(cfg, "num_key_value_heads", None) or H
    D = cfg.hidden_size
    dh = D // H
    pos = torch.arange(S)[None]
    writers, layers = names(model, split_embeds, kv_per_query_head)
    KR = H if kv_per_query_head else K  # k/v readers per layer
    y = {}
    if arch == "gpt2":
        tok, pe = base.wte(ids), base.wpe(pos).expand(B, S, D)
        if split_embeds:
            y["tok_embeds"], y["pos_embeds"] = tok, pe
        else:
            y["embeds"] = tok + pe
    elif arch == "llama":
        w = base.embed_tokens.weight
        gemma = type(model).__name__ in ("GemmaForCausalLM", "Gemma2ForCausalLM")  # sqrt(D), rounded to the dtype
        y["embeds"] = w[ids] * torch.tensor(math.sqrt(D), dtype=w.dtype) if gemma else w[ids]
    else:
        y["embeds"] = base.embed_in(ids)
    parallel = arch == "neox" and cfg.use_parallel_residual
    replace = replace or {}

    def put(d):
        for w in d:
            if w in replace:
                d[w] = replace[w]

    put(y)

    normed = {}  # reader mode: {head writer: layer}, {layer: (gain, eps, b_O)}
    post_of = {}

    def read(reader, n_upstream):
        x = torch.zeros(B, S, D, dtype=y[writers[0]].dtype)
        mixes = {}
        for w in writers[:n_upstream]:
            if edge_z is not None:
                value = y[w] + (edge_z[(w, reader)] - 1) * directions[w]
            elif isinstance(kept, dict):  # soft masks: z * clean + (1 - z) * ablated
                zw = kept.get((w, reader), 0.0)
                value = zw * y[w] + (0.0 if ablated is None else (1 - zw) * ablated[w])
            else:
                value = y[w] if (w, reader) in kept else (ablated[w] if ablated is not None else None)
            if w in normed:  # summed per layer, normed below
                layer = normed[w]
                mixes.setdefault(layer, torch.zeros_like(x))
                if value is not None:
                    mixes[layer] = mixes[layer] + value
            elif value is not None:
                x = x + value
        for layer, o in mixes.items():
            gain, eps, b = post_of[layer]
            x = x + rms_normed(o + (0 if b is None else b), gain, eps)
        return x

    for layer, blk in enumerate(blocks):
        q_names, k_names, v_names, n_up = layers[layer]
        softcap = window = attn_post = mlp_post = None
        if arch == "gpt2":
            norm1, norm2, at = blk.ln_1, blk.ln_2, blk.attn

            def proj(x, which, i, at=at):  # c_attn output is [q | k | v], each D wide
                return at.c_attn(x)[..., which * D:(which + 1) * D][..., i * dh:(i + 1) * dh]

            o_w = lambda h, at=at: at.c_proj.weight[h * dh:(h + 1) * dh, :]  # noqa: E731
            o_b, scale = at.c_proj.bias, at.scaling
        elif arch == "llama":
            at = blk.self_attn
            norm1, norm2, proj, o_w, o_b, scale, softcap, window, attn_post, mlp_post = _llama_layout(model, blk)
        else:
            norm1, norm2, at = blk.input_layernorm, blk.post_attention_layernorm, blk.attention

            def proj(x, which, i, at=at):  # query_key_value viewed [.., H, 3*dh], per head [q | k | v]
                return at.query_key_value(x).view(B, S, H, 3 * dh)[:, :, i, which * dh:(which + 1) * dh]

            o_w = lambda h, at=at: at.dense.weight[:, h * dh:(h + 1) * dh].T  # noqa: E731
            o_b, scale = at.dense.bias, at.scaling
        group = (lambda i: i // (H // K)) if KR == H else (lambda i: i)  # reader i -> its KV head
        ks = [proj(norm1(read(r, n_up)), 1, group(i)) for i, r in enumerate(k_names)]
        vs = [proj(norm1(read(r, n_up)), 2, group(i)) for i, r in enumerate(v_names)]
        outs = []
        for h, r in enumerate(q_names):
            q, k, v = proj(norm1(read(r, n_up)), 0, h), ks[h // (H // KR)], vs[h // (H // KR)]
            if rotary is not None:
                cos, sin = rotary(q, pos)
                fn = sys.modules[type(at).__module__].apply_rotary_pos_emb
                q, k = fn(q[:, None], k[:, None], cos, sin)
                q, k = q[:, 0], k[:, 0]
            scores = q @ k.transpose(-1, -2) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
            allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            z = scores.softmax(-1).nan_to_num(0.0) @ v
            outs.append(z @ o_w(h) + (0 if o_b is None else o_b / H))
        if attn_post is not None and post_norm == "reader":  # pre-norm outputs, normed by each reader
            if o_b is not None:
                outs = [o - o_b / H for o in outs]
            post_of[layer] = (*attn_post, o_b)
            normed.update({f"a{layer}.h{h}": layer for h in range(H)})
        elif attn_post is not None:  # each head's share of RMSNorm(o), o the whole attention output
            gain, eps = attn_post
            rms = torch.sqrt((sum(outs) ** 2).mean(-1, keepdim=True) + eps)
            outs = [gain * o / rms for o in outs]
        heads = {f"a{layer}.h{h}": o for h, o in enumerate(outs)}
        put(heads)
        if parallel:  # the MLP reads the same writers as the attention
            y[f"m{layer}"] = blk.mlp(norm2(read(f"m{layer}", n_up)))
            y.update(heads)
        else:
            y.update(heads)
            y[f"m{layer}"] = blk.mlp(norm2(read(f"m{layer}", n_up + H)))
        if mlp_post is not None:
            y[f"m{layer}"] = rms_normed(y[f"m{layer}"], *mlp_post)
        if f"m{layer}" in replace:
            y[f"m{layer}"] = replace[f"m{layer}"]
    logits = model.lm_head(final_norm(read("resid_post", len(writers))))
    cap = getattr(cfg, "final_logit_softcapping", None) if type(model).__name__ == "Gemma2ForCausalLM" else None
    return (logits if cap is None else cap * torch.tanh(logits / cap)), y
