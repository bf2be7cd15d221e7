"""Edge Pruning warm-started from attribution scores (``edgeprune prune --init-from``).

``read_scores(path, graph)`` carries an EAP-IG/MIB scores file (``edgeprune attribute``'s,
EAP-IG's own, a prune run's ``circuit.eap-ig.json``) onto our graph, [E] in graph order:

- EAP-IG's graph has k/v inputs per query head; on a grouped graph (one k/v reader per KV
  head) the grouped edge gets the *sum* of its heads' scores. That is exact for attribution
  scores: the grouped reader's input feeds every head of its group, so the derivative of
  the metric in the grouped edge's mask is the sum of the per-head derivatives.
- EAP-IG's one ``input`` node: with split embeddings both ``tok_embeds -> r`` and
  ``pos_embeds -> r`` get the score of ``input -> r`` (the position embedding is the same in
  the clean and corrupted inputs, so in attribution the token embedding carries it all).

``warm_log_alpha(scores, n_keep)`` maps scores to initial edge log_alphas *by rank* (best
first by |score|, EAP-IG's convention for ranking; ties by graph order), so that the
target's top edges start kept and all others start below the threshold:

    rank i < n_keep (kept):    log_alpha = high - (high - 3) * i / max(n_keep - 1, 1)   in [3, high]
    rank i >= n_keep (others): log_alpha = -3 - 3 * (i - n_keep) / max(E - n_keep - 1, 1)  in [-6, -3]

With the hard-concrete stretch (l = -0.1, r = 1.1) the deterministic mask is 1 for
log_alpha >= 2.4 and 0 for log_alpha <= -2.4, so the starting deterministic circuit is the
scores' top n_keep edges exactly; the order inside each part is kept, and the dropped edges
stay where sampling still reaches them (at -3 about 20 % of the hard-concrete draws are
non-zero, at -6 about 1 %), so training can bring them back. Node masks (when used) keep
their usual start (``init``): every node kept. n_keep = round((1 - target) * E), the count
the exact discretisation keeps (circuit.kept_count), per target of a sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .circuit import kept_count
from .graph import Graph

KEEP_LOW, DROP_HIGH, DROP_LOW = 3.0, -3.0, -6.0


def read_scores(path: str | Path, graph: Graph) -> torch.Tensor:
    """Scores [E] (float64) of ``graph``'s edges from an EAP-IG/MIB file; ValueError naming the
    file and what does not fit (another graph, an edge without a score, one not covered)."""
    from .formats import edge_from_eap, graph_from_cfg, is_eap_ig, parse_eap_ig

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"init_from: expected an EAP-IG scores file (edgeprune attribute --out), got {str(p)!r}, "
                         f"which {'is a folder' if p.is_dir() else 'does not exist'}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"init_from: {str(p)!r} is not a JSON file ({exc})") from None
    if not is_eap_ig(d):
        raise ValueError(f"init_from: expected an EAP-IG/MIB graph JSON with scores (cfg, nodes, edges), got "
                         f"{str(p)!r} with keys {sorted(d) if isinstance(d, dict) else type(d).__name__}")
    f = parse_eap_ig(d)
    theirs, c = graph_from_cfg(f.cfg).config, graph.config
    if (theirs.n_layers, set(theirs.n_heads), theirs.parallel_mlp) != (c.n_layers, set(c.n_heads), c.parallel_mlp):
        raise ValueError(f"init_from: {str(p)!r} scores a graph with n_layers={theirs.n_layers}, "
                         f"n_heads={theirs.n_heads[0]}, parallel_attn_mlp={theirs.parallel_mlp}; expected this "
                         f"model's n_layers={c.n_layers}, n_heads={c.n_heads[0]}, parallel_attn_mlp={c.parallel_mlp}")
    index = {e: i for i, e in enumerate(graph.edges())}
    out = torch.zeros(graph.n_edges, dtype=torch.float64)
    covered = torch.zeros(graph.n_edges, dtype=torch.bool)
    for name, score in zip(f.names, f.scores):
        if score is None:
            raise ValueError(f"init_from: {str(p)!r}: edge {name!r} has no score; expected a scores file")
        try:
            ours = edge_from_eap(graph, name)
        except ValueError as exc:
            raise ValueError(f"init_from: {str(p)!r}: {exc}") from None
        for e in ours:
            out[index[e]] += score
            covered[index[e]] = True
    if not bool(covered.all()):
        missing = [str(e) for e, ok in zip(graph.edges(), covered.tolist()) if not ok]
        raise ValueError(f"init_from: {str(p)!r} has no score for {len(missing)} edges of this model's graph, e.g. "
                         f"{missing[:3]}; expected a file scoring every edge")
    return out


def warm_log_alpha(scores: torch.Tensor, n_keep: int, *, high: float = 10.0) -> torch.Tensor:
    """Initial edge log_alphas [E] (float32) from scores [E] by rank (module docstring)."""
    from .ranking import rank_order

    E = scores.numel()
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= E:
        raise ValueError(f"n_keep: expected an int in [0, {E}], got {n_keep!r}")
    if not high > KEEP_LOW:
        raise ValueError(f"high: expected a log_alpha above {KEEP_LOW} (the kept edges' lowest start), got {high!r}")
    order = rank_order(scores.abs())
    i = torch.arange(E, dtype=torch.float64)
    kept = high - (high - KEEP_LOW) * i / max(n_keep - 1, 1)
    dropped = DROP_HIGH - (DROP_HIGH - DROP_LOW) * (i - n_keep) / max(E - n_keep - 1, 1)
    by_rank = torch.where(i < n_keep, kept, dropped)
    out = torch.empty(E, dtype=torch.float32)
    out[order] = by_rank.float()
    return out


@torch.no_grad()
def warm_start(masks, scores: torch.Tensor, target_sparsity: float, *, high: float = 10.0) -> int:
    """Set ``masks``' (EdgeMasks) edge log_alphas from ``scores`` [E] for a target sparsity;
    returns n_keep. Node log_alphas are left as they are."""
    n_keep = kept_count(target_sparsity, masks.graph.n_edges)
    la = warm_log_alpha(scores, n_keep, high=high)
    for g, p in zip(masks.graph.groups, masks.edge_log_alpha):
        p.copy_(la[g.offset:g.offset + g.n_edges].view_as(p).to(p.device))
    return n_keep
