"""The original Edge Pruning algorithm, rewritten from its description for benchmarking.

Not part of the package: a faithful baseline to measure ours against, on the same HF
GPT-2 weights. What makes the original slow and memory hungry is kept on purpose, in the
form the original code gives it:

- a (W_total, B, S, D) tensor of all writer slots for the clean run, another for the
  corrupted run;
- every write makes a new full-size tensor: residual + a one-hot placement computed as a
  contraction of the new outputs with a one-hot [n, W_total] matrix (the embeddings as
  broadcast products with one-hot columns); a node mask z_n mixes each new output with its
  corrupted twin first, ``z_n * y + (1 - z_n) * y~``;
- every read contracts over all W_total slots, written or not, with two einsums
  (z * clean and (1 - z) * corrupted) per reader group: the queries, keys and values of a
  layer are three groups, each with its own einsums and its own LayerNorm call;
- the full model's logits and the corrupted states come from two extra no-grad passes of
  the same disentangled model, every mask at 1.

Mixing node masks at the write gives the same reader inputs as multiplying them into the
edge masks (ARCHITECTURE.md §2): z * (z_n y + (1 - z_n) y~) + (1 - z) y~
= z z_n y + (1 - z z_n) y~.

Graph and names follow ARCHITECTURE.md §1 with split embeddings (`tok_embeds`,
`pos_embeds`), as the original counts them. Edge masks are given per reader name as
vectors over all W_total writer slots, node masks as one [W_total] vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgeprune_fast.ops import HardConcreteParams

P = HardConcreteParams()


class OriginalGPT2:
    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        cfg = hf_model.config
        self.L, self.H, self.D = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.dh = self.D // self.H
        self.writers = ["tok_embeds", "pos_embeds"]
        for layer in range(self.L):
            self.writers += [f"a{layer}.h{h}" for h in range(self.H)] + [f"m{layer}"]
        self.W = len(self.writers)
        self.slot = {name: i for i, name in enumerate(self.writers)}
        self.readers = []
        for layer in range(self.L):
            self.readers += [f"a{layer}.h{h}.{c}" for c in "qkv" for h in range(self.H)] + [f"m{layer}"]
        self.readers.append("resid_post")
        # kept on the model's device, as the original's buffers (no copies per step): per reader
        # 1 on its upstream slots, and the one-hot placement matrix of every slot
        # (in the model's dtype: a float32 buffer would promote the bf16 states to float32)
        dev, dt = hf_model.device, hf_model.dtype
        self._valid = {r: (torch.arange(self.W, device=dev) < self.upstream(r)).to(dt) for r in self.readers}
        self._one_hot = torch.eye(self.W, device=dev, dtype=dt)
        self.n_edges = sum(self.upstream(r) for r in self.readers)

    # -- masks ----------------------------------------------------------------------------
    def upstream(self, reader: str) -> int:
        """How many writer slots precede a reader (the rest are unwritten when it reads)."""
        if reader == "resid_post":
            return self.W
        layer = int(reader[1:].split(".")[0])
        first_head = self.slot[f"a{layer}.h0"]
        return first_head if reader.startswith("a") else first_head + self.H

    def valid(self, reader: str) -> torch.Tensor:
        """[W]: 1 on the slots upstream of ``reader``, 0 on the rest."""
        return self._valid[reader]

    def masks_from_edges(self, edges) -> dict[str, torch.Tensor]:
        masks = {r: torch.zeros(self.W, device=self.hf.device) for r in self.readers}
        for w, r in edges:
            masks[r][self.slot[w]] = 1.0
        return masks

    def all_ones(self) -> dict[str, torch.Tensor]:
        return {r: torch.ones(self.W, device=self.hf.device) for r in self.readers}

    @staticmethod
    def _sample(log_alpha: torch.Tensor) -> torch.Tensor:
        u = torch.rand_like(log_alpha).clamp(P.eps, 1 - P.eps)
        s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / P.beta)
        return (s * (P.right - P.left) + P.left).clamp(0, 1)

    def sample_masks(self, log_alphas: dict[str, torch.Tensor], node_log_alpha: torch.Tensor):
        """Hard-concrete samples, one PyTorch op chain per mask tensor, noise drawn per call:
        ({reader: [W] edge mask}, [W] node mask)."""
        return {r: self._sample(la) for r, la in log_alphas.items()}, self._sample(node_log_alpha)

    # -- the disentangled forward ------------------------------------------------------
    def _write(self, states, new, corrupt, z_node, first_slot):
        """Node-mix the n new outputs with their corrupted twins, then residual + one-hot
        placement (a contraction with the one-hot rows of their slots): a new full-size
        tensor per write."""
        n = new.shape[0]
        z = z_node[first_slot:first_slot + n].view(n, 1, 1, 1)
        new = new * z
        if corrupt is not None:
            new = new + corrupt[first_slot:first_slot + n] * (1 - z)
        return states + torch.einsum("nbsd,nw->wbsd", new, self._one_hot[first_slot:first_slot + n])

    def _read(self, states, corrupt, z, valid, spec):
        """z * clean + (1 - z) * corrupted over every slot; ``valid`` keeps the unwritten and
        downstream slots out (the original's common masks)."""
        x = torch.einsum(spec, states, z * valid)
        if corrupt is not None:
            x = x + torch.einsum(spec, corrupt, (1 - z) * valid)
        return x

    def forward(self, input_ids, masks: dict[str, torch.Tensor], corrupt=None, node=None):
        """Logits and the (W, B, S, D) clean writer states. masks: the edge masks per reader;
        node: the [W] node masks (None: all 1); corrupt: the corrupted states or None (zero
        ablation)."""
        hf, H, dh, D, W = self.hf.transformer, self.H, self.dh, self.D, self.W
        B, S = input_ids.shape
        dev, dt = input_ids.device, self._one_hot.dtype
        # masks are sampled in float32; a 16-bit model mixes with them in its own dtype
        masks = {r: m.to(dt) for r, m in masks.items()}
        node = torch.ones(W, device=dev, dtype=dt) if node is None else node.to(dt)
        tok, pos = hf.wte(input_ids), hf.wpe(torch.arange(S, device=dev)).expand(B, S, D)
        tok = tok * node[0] + (0 if corrupt is None else corrupt[0] * (1 - node[0]))
        pos = pos * node[1] + (0 if corrupt is None else corrupt[1] * (1 - node[1]))
        states = tok[None] * self._one_hot[0].view(W, 1, 1, 1) + pos[None] * self._one_hot[1].view(W, 1, 1, 1)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        for layer, block in enumerate(hf.h):
            first_head, valid = self.slot[f"a{layer}.h0"], self._valid[f"a{layer}.h0.q"][:, None]
            xq, xk, xv = (block.ln_1(self._read(states, corrupt, torch.stack(
                [masks[f"a{layer}.h{h}.{c}"] for h in range(H)], 1), valid, "wbsd,wh->hbsd")) for c in "qkv")
            w = block.attn.c_attn.weight.view(D, 3, H, dh)
            b = block.attn.c_attn.bias.view(3, 1, H, 1, dh)
            q = torch.einsum("hbsd,dhe->bhse", xq, w[:, 0]) + b[0]
            k = torch.einsum("hbsd,dhe->bhse", xk, w[:, 1]) + b[1]
            v = torch.einsum("hbsd,dhe->bhse", xv, w[:, 2]) + b[2]
            att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            att = att.masked_fill(~causal, torch.finfo(att.dtype).min).softmax(-1)
            zh = att @ v  # [B, H, S, dh]
            wo = block.attn.c_proj.weight.view(H, dh, D)
            heads = torch.einsum("bhse,hed->hbsd", zh, wo) + block.attn.c_proj.bias / H
            states = self._write(states, heads, corrupt, node, first_head)
            mlp = f"m{layer}"
            xm = block.ln_2(self._read(states, corrupt, masks[mlp], self._valid[mlp], "wbsd,w->bsd"))
            states = self._write(states, block.mlp(xm)[None], corrupt, node, self.slot[mlp])
        x = hf.ln_f(self._read(states, corrupt, masks["resid_post"], self._valid["resid_post"], "wbsd,w->bsd"))
        return self.hf.lm_head(x), states

    def expected_sparsity(self, log_alphas: dict[str, torch.Tensor], node_log_alpha: torch.Tensor):
        """(edge, node) sparsity 1 - sum P(z != 0) / count, differentiable, per mask tensor in
        PyTorch ops as the original computes it."""
        def p_keep(la):
            return torch.sigmoid(la - P.beta * P.log_ratio)

        kept = sum((p_keep(la) * self._valid[r]).sum() for r, la in log_alphas.items())
        return 1 - kept / self.n_edges, 1 - p_keep(node_log_alpha).mean()

    def step(self, input_ids, corrupted_ids, log_alphas, node_log_alpha, lambdas, target, optimizers):
        """One pruning step as the original runs it: two extra disentangled no-grad passes
        (full logits, corrupted states), the masked pass, KL + Lagrangian
        (lambdas [l1_e, l2_e, l1_n, l2_n], ARCHITECTURE.md §2), backward, optimiser steps
        (``optimizers``: the masks' and the lambdas' (maximize=True)). Returns the loss."""
        ones = self.all_ones()
        with torch.no_grad():
            _, corrupt = self.forward(corrupted_ids, ones)
            full_logits, _ = self.forward(input_ids, ones, None)
        masks, node = self.sample_masks(log_alphas, node_log_alpha)
        logits, _ = self.forward(input_ids, masks, corrupt, node)
        kl = F.kl_div(logits.float().log_softmax(-1), full_logits.float().log_softmax(-1), log_target=True,
                      reduction="batchmean")
        s_edge, s_node = self.expected_sparsity(log_alphas, node_log_alpha)
        gap_e, gap_n = target - s_edge, target - s_node
        loss = kl + lambdas[0] * gap_e + lambdas[1] * gap_e ** 2 + lambdas[2] * gap_n + lambdas[3] * gap_n ** 2
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return float(loss.detach())
