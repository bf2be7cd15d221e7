"""One order of every edge, from learned masks, and what circuit files carry of it.

All tensors are in graph order (``Graph.edges()``), E edges, W writers::

    effective_scores(masks)      [E] float32   min(edge log_alpha, its writer's node log_alpha)
                                               (the edge's log_alpha without node masks)
    rank_order(scores, first)    [E] int64     edge indices, best first: descending score, ties
                                               broken by graph order (earlier edge first); with
                                               ``first`` [E] bool those edges come before all others
    top_k(scores, k)             [E] bool      the first k edges of rank_order
    export_scores(scores, first) [E] float32   positive and strictly decreasing along rank_order
    prune(graph, keep)           [E] bool      EAP-IG's Graph.prune on our graph

Why ``export_scores``: tools that read a scores file (EAP-IG's ``apply_topn``, MIB's
evaluation) keep the top n edges by |score| in float32 and break ties by an unstable sort
in their own edge order. Scores that are all distinct, positive and decreasing along our
order make their top n exactly our first n for every n. They are ``scores - min + 1``
(the score itself, shifted: differences between edges are kept) rounded to float32 and then
lowered by the fewest float32 steps that make them strictly decreasing (edges whose scores
tie, or round to the same float32, or come after ``first`` edges with lower scores): with
``u`` the float32 bit patterns (monotone for positive floats), ``w_i = min(u_i, w_{i-1} - 1)``,
computed without a loop as ``cummin(u_i + i) - i``. A float32 written to JSON by Python's
shortest repr reads back as itself, so the order survives the file.

``prune`` (hannamw/EAP-IG ``Graph.prune``): repeat until nothing changes: a writer stays when
it has a kept outgoing edge and a kept incoming edge (embedding writers count as having
one); an edge stays when its writer stays and its reader's node stays (resid_post always;
a head's q/k/v readers belong to the head, a KV group's shared k/v reader to every head of
the group, the MLP's reader to the MLP).
"""

from __future__ import annotations

import numpy as np
import torch

from .graph import Graph


def effective_scores(masks) -> torch.Tensor:
    """min(edge log_alpha, its writer's node log_alpha) [E] (CPU, float32) of an EdgeMasks (or a
    model with ``.masks``): EdgeMasks.effective_scores."""
    return getattr(masks, "masks", masks).effective_scores().float().cpu()


def _check(scores: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores: expected a 1-d tensor [n_edges], got {scores!r:.80}")
    s = scores.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores: expected finite scores, got NaN or inf (did training diverge?)")
    if first is not None and (not isinstance(first, torch.Tensor) or tuple(first.shape) != tuple(s.shape)
                              or first.dtype != torch.bool):
        raise ValueError(f"first: expected a bool tensor [{s.numel()}], got {first!r:.80}")
    return s


def rank_order(scores: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Edge indices best first: descending score, ties by graph order; ``first`` edges before the rest."""
    s = _check(scores, first)
    order = torch.sort(s, descending=True, stable=True).indices  # stable: equal scores keep graph order
    if first is None:
        return order
    head = first.cpu()[order]
    return torch.cat([order[head], order[~head]])


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask [E] of the k best edges (ties at the cut broken by graph order)."""
    E = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= E:
        raise ValueError(f"k: expected an int in [0, {E}], got {k!r}")
    keep = torch.zeros(E, dtype=torch.bool)
    keep[rank_order(scores)[:k]] = True
    return keep


def export_scores(scores: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scores > 0, strictly decreasing along ``rank_order(scores, first)`` (module docstring)."""
    s = _check(scores, first)
    order = rank_order(s, first).numpy()
    target = (s.numpy() - float(s.min()) + 1.0)[order].astype(np.float32)  # >= 1
    bits = target.view(np.int32).astype(np.int64)
    steps = np.arange(len(bits), dtype=np.int64)
    lowered = (np.minimum.accumulate(bits + steps) - steps).astype(np.int32)  # >= bits(1.0) - E > 0
    out = np.empty(len(bits), dtype=np.float32)
    out[order] = lowered.view(np.float32)
    return torch.from_numpy(out)


# -- EAP-IG's prune -----------------------------------------------------------------------------------
def _reader_owners(graph: Graph) -> tuple[torch.Tensor, list[list[int]]]:
    """(reader index of every edge [E], the writer slots each reader belongs to (empty: resid_post))."""
    c, owners, reader_of_edge = graph.config, [], []
    for g in graph.groups:
        for r in g.readers:
            layer = g.layer
            if r.endswith((".q", ".k", ".v")):
                kind, idx = r.split(".")[1][0], int(r.split(".")[1][1:])
                if kind == "h":
                    heads = [idx]
                else:  # a KV group's shared reader
                    per = c.n_heads[layer] // c.n_kv_heads[layer]
                    heads = list(range(idx * per, (idx + 1) * per))
                owners.append([graph.slot(f"a{layer}.h{h}") for h in heads])
            elif layer is not None:
                owners.append([graph.slot(f"m{layer}")])
            else:
                owners.append([])
            reader_of_edge.append(torch.full((g.n_upstream,), len(owners) - 1, dtype=torch.long))
    return torch.cat(reader_of_edge), owners


def prune(graph: Graph, keep: torch.Tensor) -> torch.Tensor:
    """EAP-IG's ``Graph.prune`` on ``keep`` [E] bool (graph order): see the module docstring."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (graph.n_edges,):
        raise ValueError(f"keep: expected a bool tensor [{graph.n_edges}], got {keep!r:.80}")
    reader, owners = _reader_owners(graph)
    writer = torch.cat([torch.arange(g.n_upstream).repeat(len(g.readers)) for g in graph.groups])
    pair_reader = torch.tensor([r for r, ws in enumerate(owners) for _ in ws], dtype=torch.long)
    pair_writer = torch.tensor([w for ws in owners for w in ws], dtype=torch.long)
    always_in = torch.tensor([not ws for ws in owners])  # resid_post
    n_embeds = 2 if graph.config.split_embeds else 1
    W, R = graph.n_writers, len(owners)
    keep = keep.clone()
    while True:
        out = torch.zeros(W, dtype=torch.bool).index_put_((writer,), keep, accumulate=True)
        fed = torch.zeros(R, dtype=torch.bool).index_put_((reader,), keep, accumulate=True)
        inc = torch.zeros(W, dtype=torch.bool).index_put_((pair_writer,), fed[pair_reader], accumulate=True)
        inc[:n_embeds] = True
        alive = out & inc
        reader_alive = always_in.clone().index_put_((pair_reader,), alive[pair_writer], accumulate=True)
        new = keep & alive[writer] & reader_alive[reader]
        if torch.equal(new, keep):
            return keep
        keep = new
