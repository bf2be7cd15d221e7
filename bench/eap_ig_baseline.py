"""EAP and EAP-IG-inputs as EAP-IG computes them, op for op, for benchmarking.

Not part of the package, and not EAP-IG's code: a rewrite from its description
(hannamw/EAP-IG ``src/eap/attribute.py`` and ``utils.make_hooks_and_matrices``, on
TransformerLens with ``use_split_qkv_input``, ``use_attn_result``, ``use_hook_mlp_in`` and
``ungroup_grouped_query_attention``) on the same HF weights, keeping what sets its cost:

- the residual stream is repeated per head for the q, k and v inputs ([B, S, H, D] each,
  one per *query* head, also for grouped KV heads: TransformerLens' ungrouping), each
  normalised and projected separately; every head's result is materialised [B, S, H, D]
  (``hook_result``) before the sum;
- forward hooks fill ``activation_difference [B, S, n_forward, D]`` (corrupted minus clean);
- a backward hook on every reader input adds ``einsum(activation_difference[:, :, :prev],
  grad, 'b p f d, b p r d -> f r')`` into ``scores [n_forward, n_backward]``;
- EAP-IG-inputs: the input node (``blocks.0.hook_resid_pre``) replaced by
  corrupted + k/steps (clean - corrupted), k = 0 .. steps-1, one forward and backward each.

Metric: EAP-IG's usage, ``logit_diff(loss=True, mean=True)`` = -mean logit difference at
the last position; scores divided by the number of examples (their ``total_items``) and steps.
GPT-2 and Llama layouts (no padding).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


class EapIgBaseline:
    def __init__(self, hf):
        self.hf = hf.eval().requires_grad_(False)  # no weight gradients (ours computes none either)
        name = type(hf).__name__
        self.gpt2 = name == "GPT2LMHeadModel"
        cfg = hf.config
        self.L, self.H = cfg.num_hidden_layers, cfg.num_attention_heads
        self.D = cfg.hidden_size
        self.dh = self.D // self.H
        self.n_forward = 1 + self.L * (self.H + 1)
        self.n_backward = self.L * (3 * self.H + 1) + 1
        self.layers = [self._layer(i) for i in range(self.L)]

    def _layer(self, i: int) -> dict:
        H, D, dh = self.H, self.D, self.dh
        if self.gpt2:
            b = self.hf.transformer.h[i]
            w, bias = b.attn.c_attn.weight, b.attn.c_attn.bias  # [D, 3D], x @ w
            W = [w[:, j * D:(j + 1) * D].view(D, H, dh).permute(1, 0, 2) for j in range(3)]  # [H, D, dh]
            B_ = [bias[j * D:(j + 1) * D].view(H, dh) for j in range(3)]
            W_O = b.attn.c_proj.weight.view(H, dh, D)
            return dict(ln1=b.ln_1, ln2=b.ln_2, W=W, b=B_, W_O=W_O, b_O=b.attn.c_proj.bias, mlp=b.mlp, rot=None)
        b = self.hf.model.layers[i]
        at = b.self_attn
        K = self.hf.config.num_key_value_heads

        def heads(lin, n):
            Wt = lin.weight.view(n, dh, D).transpose(1, 2)  # [n, D, dh]
            bt = None if lin.bias is None else lin.bias.view(n, dh)
            if n != H:  # TransformerLens' ungroup_grouped_query_attention: weights repeated per query head
                Wt = Wt.repeat_interleave(H // n, 0)
                bt = None if bt is None else bt.repeat_interleave(H // n, 0)
            return Wt, bt

        (Wq, bq), (Wk, bk), (Wv, bv) = heads(at.q_proj, H), heads(at.k_proj, K), heads(at.v_proj, K)
        W_O = at.o_proj.weight.view(D, H, dh).permute(1, 2, 0)
        rot = sys.modules[type(at).__module__].apply_rotary_pos_emb
        return dict(ln1=b.input_layernorm, ln2=b.post_attention_layernorm, W=[Wq, Wk, Wv], b=[bq, bk, bv],
                    W_O=W_O, b_O=at.o_proj.bias, mlp=b.mlp, rot=rot)

    # -- the forward, with EAP-IG's hook points -----------------------------------------------------
    def forward(self, ids, *, fwd=None, bwd=None, input_override=None):
        """logits; ``fwd(index, acts)`` at every writer (input [B,S,D], heads [B,S,H,D], mlp);
        ``bwd(prev, back, grad_tensor)`` registers on every reader input."""
        B, S = ids.shape
        pos = torch.arange(S)[None]
        if self.gpt2:
            t = self.hf.transformer
            resid = t.wte(ids) + t.wpe(pos)
        else:
            resid = self.hf.model.embed_tokens(ids)
        if input_override is not None:
            resid = input_override
        elif bwd is not None:  # EAP: gradients start at the reader inputs, not at frozen weights
            resid = resid.detach().requires_grad_(True)
        if fwd is not None:
            fwd(slice(0, 1), resid[:, :, None])
        rope = None if self.gpt2 else self.hf.model.rotary_emb(resid, pos)
        for i, lay in enumerate(self.layers):
            prev = 1 + i * (self.H + 1)
            inputs = []
            for j in range(3):  # hook_q_input / hook_k_input / hook_v_input: [B, S, H, D]
                x = resid[:, :, None, :].expand(B, S, self.H, self.D)
                if bwd is not None:
                    x = x.clone()  # TransformerLens' hook point output, a tensor of its own
                    bwd(prev, slice(i * (3 * self.H + 1) + j * self.H, i * (3 * self.H + 1) + (j + 1) * self.H), x)
                inputs.append(x)
            proj = []
            for j in range(3):
                y = torch.einsum("bshd,hde->bshe", lay["ln1"](inputs[j]), lay["W"][j])
                proj.append(y if lay["b"][j] is None else y + lay["b"][j])
            q, k, v = (p.transpose(1, 2) for p in proj)  # [B, H, S, dh]
            if rope is not None:
                q, k = lay["rot"](q, k, *rope)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # [B, S, H, dh]
            result = torch.einsum("bshe,hed->bshd", z, lay["W_O"])  # hook_result [B, S, H, D]
            if fwd is not None:
                fwd(slice(prev, prev + self.H), result)
            attn_out = result.sum(2) + (0 if lay["b_O"] is None else lay["b_O"])
            mid = resid + attn_out
            mlp_in = mid
            if bwd is not None:
                mlp_in = mid.clone()  # hook_mlp_in
                bwd(prev + self.H, i * (3 * self.H + 1) + 3 * self.H, mlp_in)
            out = lay["mlp"](lay["ln2"](mlp_in))
            if fwd is not None:
                fwd(slice(prev + self.H, prev + self.H + 1), out[:, :, None])
            resid = mid + out
        if bwd is not None:
            resid = resid.clone()  # the logits node's input
            bwd(self.n_forward, self.n_backward - 1, resid)
        if self.gpt2:
            return self.hf.lm_head(self.hf.transformer.ln_f(resid))
        return self.hf.lm_head(self.hf.model.norm(resid))

    # -- attribution ---------------------------------------------------------------------------------
    def scores(self, ids, cids, labels, other, *, method: str = "eap-ig", steps: int = 5) -> torch.Tensor:
        """[n_forward, n_backward] scores, EAP-IG's matrix and normalisation."""
        B, S = ids.shape
        diff = torch.zeros(B, S, self.n_forward, self.D, dtype=self.hf.dtype)
        scores = torch.zeros(self.n_forward, self.n_backward, dtype=self.hf.dtype)

        def add(index, acts):
            diff[:, :, index] += acts.detach()

        def sub(index, acts):
            diff[:, :, index] -= acts.detach()

        def bwd(prev, back, x):
            def hook(g):
                g = g if g.dim() == 4 else g[:, :, None]  # an MLP's / the logits' input: one reader
                s = torch.einsum("bpfd,bprd->fr", diff[:, :, :prev], g.detach())
                scores[:prev, back] += s.squeeze(1) if isinstance(back, int) else s
            x.register_hook(hook)

        def metric(logits):
            last = logits[:, -1]
            return -(last.gather(1, labels[:, None]) - last.gather(1, other[:, None])).mean()

        with torch.no_grad():
            self.forward(cids, fwd=add)
            inp_corrupted = diff[:, :, 0].clone()
            self.forward(ids, fwd=sub)
            inp_clean = inp_corrupted - diff[:, :, 0]
        runs = [None] if method == "eap" else list(range(steps))
        for k in runs:
            override = None if k is None else (inp_corrupted + k / steps * (inp_clean - inp_corrupted)).clone()
            if override is not None:
                override.requires_grad_(True)
            metric(self.forward(ids, bwd=bwd, input_override=override)).backward()
        return scores / B / len(runs)
