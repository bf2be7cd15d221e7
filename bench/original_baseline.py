"""The original Edge Pruning algorithm, rewritten from its description for benchmarking.

Not part of the package: a faithful baseline to measure ours against, on the same HF
GPT-2 weights. What makes the original slow and memory hungry is kept on purpose:

- a (W_total, B, S, D) tensor of all writer slots for the clean run, another for the
  corrupted run;
- every write makes a new full-size tensor (residual + one-hot placement of the new
  writer outputs, padded to all W_total slots);
- every read contracts over all W_total slots, written or not, with two einsums
  (z * clean and (1 - z) * corrupted), masks sampled in separate PyTorch ops;
- the full model's logits and the corrupted states come from two extra passes of the same
  disentangled model with every mask at 1.

Graph and names follow ARCHITECTURE.md §1 with split embeddings (`tok_embeds`,
`pos_embeds`), as the original counts them. Masks are given per reader name as vectors
over all W_total writer slots.
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
        # per reader, 1 on its upstream slots; kept on the model's device (no copies per step)
        dev = hf_model.device
        self._valid = {r: (torch.arange(self.W, device=dev) < self.upstream(r)).float() for r in self.readers}
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
        return dict(self._valid)

    def sample_masks(self, log_alphas: dict[str, torch.Tensor], node_log_alpha: torch.Tensor) -> dict:
        """Hard-concrete samples, one PyTorch op chain per mask tensor, noise drawn per call."""
        def sample(la):
            u = torch.rand_like(la).clamp(P.eps, 1 - P.eps)
            s = torch.sigmoid((u.log() - (1 - u).log() + la) / P.beta)
            return (s * (P.right - P.left) + P.left).clamp(0, 1)

        z_node = sample(node_log_alpha)
        out = {}
        for r, la in log_alphas.items():
            out[r] = sample(la) * z_node * self._valid[r]
        return out

    # -- the disentangled forward ------------------------------------------------------
    def _write(self, states, new, first_slot):
        """residual + one-hot placement: a new full-size tensor per write."""
        n = new.shape[0]
        return states + F.pad(new, (0, 0, 0, 0, 0, 0, first_slot, self.W - first_slot - n))

    def _read(self, states, corrupt, z, readers):
        z = z.to(states.dtype)
        x = torch.einsum("wbsd,rw->rbsd", states, z)
        if corrupt is not None:
            # (1 - z) on the reader's upstream slots only: the corrupted stack is complete,
            # and downstream writers must not leak into an upstream reader
            valid = torch.stack([self._valid[r] for r in readers]).to(z)
            x = x + torch.einsum("wbsd,rw->rbsd", corrupt, valid - z)
        return x

    def forward(self, input_ids, masks: dict[str, torch.Tensor], corrupt=None):
        """Logits and the (W, B, S, D) clean writer states. corrupt: the corrupted states or
        None (zero ablation)."""
        hf, H, dh, D = self.hf.transformer, self.H, self.dh, self.D
        B, S = input_ids.shape
        dev = input_ids.device
        states = torch.zeros(self.W, B, S, D, device=dev, dtype=hf.wte.weight.dtype)
        pos = torch.arange(S, device=dev)
        states = self._write(states, hf.wte(input_ids)[None], 0)
        states = self._write(states, hf.wpe(pos).expand(B, S, D)[None], 1)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        for layer, block in enumerate(hf.h):
            names = [f"a{layer}.h{h}.{c}" for c in "qkv" for h in range(H)]
            z = torch.stack([masks[n] for n in names])
            x = block.ln_1(self._read(states, corrupt, z, names))  # [3H, B, S, D]
            w = block.attn.c_attn.weight.view(D, 3, H, dh)
            b = block.attn.c_attn.bias.view(3, H, dh)
            xq, xk, xv = x.view(3, H, B, S, D)
            q = torch.einsum("hbsd,dhe->bhse", xq, w[:, 0]) + b[0][None, :, None]
            k = torch.einsum("hbsd,dhe->bhse", xk, w[:, 1]) + b[1][None, :, None]
            v = torch.einsum("hbsd,dhe->bhse", xv, w[:, 2]) + b[2][None, :, None]
            att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            att = att.masked_fill(~causal, torch.finfo(att.dtype).min).softmax(-1)
            zh = att @ v  # [B, H, S, dh]
            wo = block.attn.c_proj.weight.view(H, dh, D)
            heads = torch.einsum("bhse,hed->hbsd", zh, wo) + block.attn.c_proj.bias / H
            states = self._write(states, heads, self.slot[f"a{layer}.h0"])
            xm = block.ln_2(self._read(states, corrupt, masks[f"m{layer}"][None], [f"m{layer}"]))[0]
            states = self._write(states, block.mlp(xm)[None], self.slot[f"m{layer}"])
        x = hf.ln_f(self._read(states, corrupt, masks["resid_post"][None], ["resid_post"])[0])
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
        masks = self.sample_masks(log_alphas, node_log_alpha)
        logits, _ = self.forward(input_ids, masks, corrupt)
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
