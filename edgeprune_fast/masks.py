"""Mask parameters of an edge-pruned model: hard-concrete log_alpha per edge and per node.

Storage follows the graph's reader groups (graph.py): group i has ``edge_log_alpha[i]``
[n_readers_i, n_upstream_i] (float32), row = reader, column = writer slot; the node masks
are one vector ``node_log_alpha`` [W] over all writers, shared by every reader in a forward
(z_eff[r, w] = z_edge[r, w] * z_node[w], ARCHITECTURE.md §2). Flattening the groups in
order gives the edges in graph order (``Graph.edges()``).

Initialisation: N(init, init_std) (the original uses mean 10, std 0.01), so every mask
starts near 1. A fixed circuit (``set_circuit``) overrides the learned masks with exact
0/1 values until ``clear_circuit``.

Saved form (``save``/``load``, safetensors): tensors ``edges.<group key>`` (a0, m0, ...,
resid_post) and ``nodes``; metadata ``graph`` (Graph.signature()) is checked on load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .graph import Edge, Graph
from .ops import expected_l0
from .ops.params import HardConcreteParams, resolve


class EdgeMasks(nn.Module):
    """log_alpha parameters for every edge (and optionally every node) of ``graph``."""

    def __init__(self, graph: Graph, *, node_masks: bool = True, init: float = 10.0, init_std: float = 0.01,
                 params: HardConcreteParams | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (isinstance(init, (int, float)) and abs(init) < 1e4):
            raise ValueError(f"init: expected a finite number (log_alpha's initial mean), got {init!r}")
        if not (isinstance(init_std, (int, float)) and 0 <= init_std < 1e3):
            raise ValueError(f"init_std: expected a number >= 0, got {init_std!r}")
        self.graph, self.params = graph, resolve(params)
        self.edge_log_alpha = nn.ParameterList(
            nn.Parameter(torch.empty(len(g.readers), g.n_upstream, device=device)) for g in graph.groups)
        self.node_log_alpha = nn.Parameter(torch.empty(graph.n_writers, device=device)) if node_masks else None
        self.reset(init, init_std)
        self.circuit: list[torch.Tensor] | None = None  # fixed 0/1 masks per group, or None

    @torch.no_grad()
    def reset(self, init: float = 10.0, init_std: float = 0.01) -> None:
        """Draw every log_alpha from N(init, init_std) (torch's default generator)."""
        for p in self.parameters():
            p.normal_(init, init_std)

    # -- circuits ----------------------------------------------------------------------------
    def circuit_masks(self, edges: Iterable[str | Sequence[str] | Edge]) -> list[torch.Tensor]:
        """Exact 0/1 masks per group with 1 on ``edges`` (ValueError naming an unknown edge)."""
        dev = self.edge_log_alpha[0].device
        z = [torch.zeros(len(g.readers), g.n_upstream, device=dev) for g in self.graph.groups]
        if isinstance(edges, (str, Edge)):
            raise ValueError(f"edges: expected a list of edges, got a single edge {edges!r}")
        for e in edges:
            gi, row, col = self.graph.edge_index(e)
            z[gi][row, col] = 1.0
        return z

    def set_circuit(self, edges: Iterable[str | Sequence[str] | Edge]) -> None:
        self.circuit = self.circuit_masks(edges)

    def clear_circuit(self) -> None:
        self.circuit = None

    # -- sparsity and scores -------------------------------------------------------------------
    def expected_sparsity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge sparsity, node sparsity), differentiable in log_alpha: 1 - expected kept / total,
        with P(z != 0) from ``expected_l0``; an edge counts as kept only with its writer
        (sum over edges of P(edge) * P(node of its writer)). Node sparsity is 0 without node masks."""
        p_node = None if self.node_log_alpha is None else expected_l0(self.node_log_alpha, self.params)
        kept = torch.zeros((), device=self.edge_log_alpha[0].device)
        for la in self.edge_log_alpha:
            p = expected_l0(la, self.params)
            kept = kept + (p.sum() if p_node is None else (p * p_node[: la.shape[1]]).sum())
        edge_sparsity = 1 - kept / self.graph.n_edges
        node_sparsity = torch.zeros_like(edge_sparsity) if p_node is None else 1 - p_node.mean()
        return edge_sparsity, node_sparsity

    def circuit_sparsity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge sparsity, node sparsity 0) of the fixed circuit."""
        kept = sum(float(z.detach().sum()) for z in self.circuit)
        t = torch.tensor(1 - kept / self.graph.n_edges, device=self.circuit[0].device)
        return t, torch.zeros_like(t)

    @torch.no_grad()
    def edge_scores(self) -> torch.Tensor:
        """log_alpha of every edge in graph order [n_edges] (float32, detached). Deterministic
        and strictly monotone in both the deterministic mask and P(z != 0), without the ties
        of the clamped mask (``effective_scores`` combines it with the node masks)."""
        return torch.cat([la.detach().flatten() for la in self.edge_log_alpha])

    @torch.no_grad()
    def effective_scores(self) -> torch.Tensor:
        """Per edge in graph order [n_edges]: min(edge log_alpha, its writer's node log_alpha)
        (the edge's log_alpha without node masks). z_det is monotone in log_alpha and the
        deterministic masks multiply, so the edge's effective mask z_det(edge) * z_det(node)
        is non-zero iff this is above log(-l/r); circuits are prefixes of its ranking
        (circuit.py)."""
        scores = self.edge_scores()
        if self.node_log_alpha is None:
            return scores
        return torch.minimum(scores, self.node_log_alpha.detach()[self.writer_index().to(scores.device)])

    @torch.no_grad()
    def node_scores(self) -> torch.Tensor | None:
        """log_alpha of every writer [W] in writer order, or None without node masks."""
        return None if self.node_log_alpha is None else self.node_log_alpha.detach().clone()

    def writer_index(self) -> torch.Tensor:
        """The writer slot of every edge in graph order [n_edges] (int64)."""
        return torch.cat([torch.arange(g.n_upstream).repeat(len(g.readers)) for g in self.graph.groups])

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = {f"edges.{g.key}": la for g, la in zip(self.graph.groups, self.edge_log_alpha)}
        if self.node_log_alpha is not None:
            out["nodes"] = self.node_log_alpha
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy log_alphas in; ValueError naming a missing, unexpected or misshapen key."""
        own = self.state()
        if missing := [k for k in own if k not in state]:
            raise ValueError(f"mask state: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"(expected {len(own)} keys like {list(own)[:3]})")
        if extra := [k for k in state if k not in own]:
            raise ValueError(f"mask state: unexpected keys {extra[:5]} (node_masks={self.node_log_alpha is not None}; "
                             f"expected {list(own)[:3]} ...)")
        for k, t in own.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise ValueError(f"mask state: {k!r} expected shape {tuple(t.shape)}, got {tuple(state[k].shape)}")
        for k, t in own.items():
            t.copy_(state[k].to(t.device, t.dtype))

    def save(self, path: str | Path) -> Path:
        """Write the log_alphas (atomically, with the graph's signature); returns the path."""
        from .staging import write_atomically

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state().items()}
        return write_atomically(Path(path), lambda tmp: save_file(
            tensors, str(tmp), metadata={"format": "edgeprune_fast.masks", "graph": self.graph.signature()}))

    def load(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"path: expected a masks file written by save_masks, got {str(p)!r} (no such file)")
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("graph") not in (None, self.graph.signature()):
            raise ValueError(f"path: {str(p)!r} holds masks of another graph {meta['graph']}; "
                             f"this model's graph is {self.graph.signature()}")
        self.load_state(load_file(str(p)))
