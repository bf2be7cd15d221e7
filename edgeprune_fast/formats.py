"""The graph JSON of EAP-IG (hannamw/EAP-IG, ``Graph.to_json``/``from_json``) and of the MIB
benchmark's circuit track, both ways, and loading any circuit file.

Their file, as their current code writes it (``Graph.to_json`` since EAP-IG commit 13c0033,
2025-02-23) and reads it (``Graph.from_json``: ``from_model(cfg)``, then each node's and
edge's fields)::

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "m0": {...}, ...,
               "logits": {"in_graph": true}},
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": true}, ..., "m2->logits": {...}}}

``from_json`` needs ``d_model`` (``from_model`` sizes its neuron tensors with it) and a dict
per node (``node_dict['in_graph']``: a bare bool, the 2024 form that EAP-IG wrote before
13c0033, is a TypeError there). We write the current form, always with ``d_model``, and
read both. Node flags are informative only: EAP-IG's ``evaluate_graph`` prunes and so
recomputes them from the edges; we write a node in_graph when it has a kept outgoing edge
and a kept incoming edge (``input`` needs none), as their ``apply_topn`` sets them, and
``logits`` always (their LogitNode is always in the graph).

Their graph has one ``input`` node, per-head attention nodes whose inputs are split by
query/key/value (the ``<q>``/``<k>``/``<v>`` suffix of an edge into a head; one k and one v
input per *query* head, also for grouped-query models, which MIB loads with
TransformerLens' ``ungroup_grouped_query_attention``), MLP nodes and ``logits``. Names:

    ours                          theirs
    embeds                        input
    tok_embeds, pos_embeds        input (both; see below)
    a{l}.h{h}        (writer)     a{l}.h{h}
    m{l}             (writer)     m{l}
    a{l}.h{h}.q / .k / .v         a{l}.h{h}<q> / <k> / <v>   (the reader side of an edge)
    a{l}.g{g}.k / .v (grouped)    a{l}.h{h}<k> / <v> for every query head h of KV group g
    m{l}             (reader)     m{l}
    resid_post                    logits

    edge "a0.h1->a2.h3.q"  <->  "a0.h1->a2.h3<q>";   "m1->resid_post"  <->  "m1->logits"

With one embedding node and k/v readers per query head (``kv_per_query_head``, MIB's graph:
``mib_graph``) the mapping is a bijection and both directions round-trip exactly.
Otherwise:

- Grouped graph (one k/v reader per KV head): export writes a grouped edge to every query
  head of its group (nothing is lost). Import needs every head of a group to agree, else
  ``gqa="strict"`` (the default) raises a ValueError naming the group and the edges that
  disagree; ``gqa="union"`` keeps the grouped edge when any head has it, ``"intersection"``
  when all do (scores: the largest / smallest of the heads').
- Split embeddings: export merges ``tok_embeds->r`` and ``pos_embeds->r`` into ``input->r``;
  where the two disagree that changes the circuit, so ``split_embeds="refuse"`` (default)
  raises a ValueError naming those edges and ``"merge"`` keeps ``input->r`` when either is
  kept (a warning names them). Import into a split graph keeps both.

Scores: export writes the caller's score per edge of ours (missing: 1.0 in the circuit, 0.0
outside). ``mib_eap_ig`` writes a circuit on MIB's graph with ``ranking.export_scores`` of the
effective log_alphas (the circuit first, then every other edge by that score, all distinct
also where a grouped edge becomes one per query head): the top n by |score| are then our
first n for every n; ``scores_on_mib_graph`` carries scores of our graph to MIB's. A file whose edges are all ``in_graph: false`` holds
scores only (MIB's importance files): loading it as a circuit is an error unless
``top_n``/``top_percent`` picks the edges, as EAP-IG's ``apply_topn(n, absolute=True)``
does: the n largest |score| over the file's graph (ties in their matrix order, forward
index then backward index, which their unstable argsort does not promise), then ``prune``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .circuit import Circuit, read_circuit_json
from .graph import EMBEDS, POS_EMBEDS, RESID_POST, TOK_EMBEDS, Edge, Graph, GraphConfig

INPUT, LOGITS = "input", "logits"
GQA_RULES = ("strict", "union", "intersection")
SPLIT_RULES = ("refuse", "merge")
_EAP_READER = re.compile(r"a(\d+)\.h(\d+)<([qkv])>")
_OUR_QKV = re.compile(r"a(\d+)\.([hg])(\d+)\.([qkv])")


def is_eap_ig(d: Any) -> bool:
    """Whether a parsed JSON object looks like an EAP-IG/MIB graph (cfg, nodes, edges as a dict)."""
    return isinstance(d, Mapping) and {"cfg", "nodes", "edges"} <= set(d) and isinstance(d["edges"], Mapping)


def _cfg_ints(cfg: Mapping[str, Any]) -> tuple[int, int]:
    try:
        return int(cfg["n_layers"]), int(cfg["n_heads"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"cfg: expected n_layers and n_heads (ints), got {dict(cfg)!r:.200}") from None


def graph_from_cfg(cfg: Mapping[str, Any]) -> Graph:
    """The graph of an EAP-IG cfg (theirs exactly: one ``embeds`` writer, k/v per head)."""
    n_layers, n_heads = _cfg_ints(cfg)
    return Graph.build(n_layers, n_heads, parallel_mlp=bool(cfg.get("parallel_attn_mlp", False)))


def mib_graph(graph: Graph) -> Graph:
    """The graph EAP-IG/MIB files have for this model: one embedding writer, k/v readers per query head."""
    c = graph.config
    return Graph(GraphConfig(c.n_layers, c.n_heads, c.n_kv_heads, False, c.parallel_mlp, True))


def _check_cfg(graph: Graph, cfg: Mapping[str, Any]) -> None:
    c = graph.config
    heads = set(c.n_heads)
    n_layers, n_heads = _cfg_ints(cfg)
    if n_layers != c.n_layers or heads != {n_heads}:
        raise ValueError(f"cfg: the file's graph has n_layers={cfg.get('n_layers')}, n_heads={cfg.get('n_heads')}; "
                         f"expected this model's n_layers={c.n_layers}, n_heads={c.n_heads[0] if len(heads) == 1 else c.n_heads}")
    if bool(cfg.get("parallel_attn_mlp", False)) != c.parallel_mlp:
        raise ValueError(f"cfg: parallel_attn_mlp is {cfg.get('parallel_attn_mlp')} in the file, expected {c.parallel_mlp}")


# -- names -----------------------------------------------------------------------------------------
def writer_to_eap(name: str) -> str:
    return INPUT if name in (EMBEDS, TOK_EMBEDS, POS_EMBEDS) else name


def reader_to_eap(graph: Graph, name: str) -> list[str]:
    """Their reader names for one of ours (several for a grouped k/v reader)."""
    if name == RESID_POST:
        return [LOGITS]
    m = _OUR_QKV.fullmatch(name)
    if not m:
        return [name]  # m{l}
    layer, kind, idx, qkv = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "h":
        return [f"a{layer}.h{idx}<{qkv}>"]
    per = graph.config.n_heads[layer] // graph.config.n_kv_heads[layer]
    return [f"a{layer}.h{h}<{qkv}>" for h in range(idx * per, (idx + 1) * per)]


def edge_to_eap(graph: Graph, edge: Edge) -> list[str]:
    w = writer_to_eap(edge.writer)
    return [f"{w}->{r}" for r in reader_to_eap(graph, edge.reader)]


def edge_from_eap(graph: Graph, name: str) -> list[Edge]:
    """Our edges for one of their edge names (ValueError naming a malformed or unknown edge)."""
    parts = name.split("->")
    if len(parts) != 2:
        raise ValueError(f"edges: expected an EAP-IG edge name like 'a0.h1->a2.h3<q>' or 'm0->logits', got {name!r}")
    w, r = parts
    writers = ([TOK_EMBEDS, POS_EMBEDS] if graph.config.split_embeds else [EMBEDS]) if w == INPUT else [w]
    if r == LOGITS:
        reader = RESID_POST
    elif m := _EAP_READER.fullmatch(r):
        layer, head, qkv = int(m[1]), int(m[2]), m[3]
        if layer >= graph.config.n_layers or head >= graph.config.n_heads[layer]:
            raise ValueError(f"edges: {name!r} names head {head} of layer {layer}, which this graph does not have")
        H, K = graph.config.n_heads[layer], graph.config.kv_readers(layer)
        reader = f"a{layer}.h{head}.{qkv}" if qkv == "q" or H == K else f"a{layer}.g{head // (H // K)}.{qkv}"
    else:
        reader = r
    out = [Edge(x, reader) for x in writers]
    for e in out:
        graph.edge_index(e)  # ValueError naming the edge if it does not exist
    return out


def eap_matrix_position(n_layers: int, n_heads: int, name: str) -> int:
    """Where an edge sits in EAP-IG's flattened [n_forward, n_backward] score matrix
    (``Graph._forward_index`` / ``_backward_index``): their order for ties in ``apply_topn``."""
    w, r = name.split("->")
    H = n_heads
    n_backward = n_layers * (3 * H + 1) + 1

    def forward(node: str) -> int:
        if node == INPUT:
            return 0
        if node[0] == "m":
            return 1 + int(node[1:]) * (H + 1) + H
        layer, head = node.split(".")
        return 1 + int(layer[1:]) * (H + 1) + int(head[1:])

    if r == LOGITS:
        back = n_backward - 1
    elif m := _EAP_READER.fullmatch(r):
        back = int(m[1]) * (3 * H + 1) + "qkv".index(m[3]) * H + int(m[2])
    else:
        back = int(r[1:]) * (3 * H + 1) + 3 * H
    return forward(w) * n_backward + back


# -- export ----------------------------------------------------------------------------------------
def _merged_embedding_changes(graph: Graph, kept: set[Edge]) -> list[str]:
    """``input->r`` names where tok_embeds->r and pos_embeds->r disagree (split graphs only)."""
    if not graph.config.split_embeds:
        return []
    out = []
    for e in graph.edges():
        if e.writer == TOK_EMBEDS and (e in kept) != (Edge(POS_EMBEDS, e.reader) in kept):
            out += edge_to_eap(graph, e)
    return out


def to_eap_ig(graph: Graph, edges: Iterable[Edge | tuple[str, str]], scores: Mapping[Edge, float] | None = None,
              *, d_model: int, split_embeds: str = "refuse") -> dict[str, Any]:
    """The EAP-IG/MIB JSON object of a circuit on ``graph`` (see the module docstring): every
    edge of the graph, ``in_graph`` true on the circuit's. ``scores``: per edge of ours
    (missing: 1.0 in the circuit, 0.0 outside); ``d_model``: the model's width (their loader
    needs it); ``split_embeds``: "refuse" or "merge" (split graphs)."""
    c = graph.config
    if len(set(c.n_heads)) != 1:
        raise ValueError(f"graph: the EAP-IG format has one n_heads for all layers, this graph has {c.n_heads}")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model: expected the model's width (a positive int; EAP-IG's loader needs it), got {d_model!r}")
    if split_embeds not in SPLIT_RULES:
        raise ValueError(f"split_embeds: expected one of {SPLIT_RULES}, got {split_embeds!r}")
    kept = {Edge.parse(e) for e in edges}
    if changed := _merged_embedding_changes(graph, kept):
        what = (f"{len(changed)} edges change when tok_embeds and pos_embeds merge into EAP-IG's one 'input' node "
                f"(one of the two is kept, the other not), e.g. {changed[:5]}")
        if split_embeds == "refuse":
            raise ValueError(f"split_embeds: {what}; expected a graph without split embeddings, or "
                             f"split_embeds='merge' to keep input->r when either is kept")
        warnings.warn(f"split_embeds='merge': {what}; input->r is kept where either is", stacklevel=2)
    cfg = {"n_layers": c.n_layers, "n_heads": c.n_heads[0], "parallel_attn_mlp": c.parallel_mlp, "d_model": d_model}
    out_edges: dict[str, dict[str, Any]] = {}
    for e in graph.edges():
        score = float(scores[e]) if scores is not None and e in scores else float(e in kept)
        if not math.isfinite(score):
            raise ValueError(f"scores: {str(e)!r} has score {score} (expected finite scores)")
        for name in edge_to_eap(graph, e):
            prev = out_edges.get(name)  # split embeds: tok and pos map to one input->r
            out_edges[name] = {"score": score if prev is None else max(score, prev["score"]),
                               "in_graph": e in kept or (prev is not None and prev["in_graph"])}
    outgoing, incoming = set(), {INPUT}  # input needs no incoming edge
    for name, info in out_edges.items():
        if info["in_graph"]:
            w, r = name.split("->")
            outgoing.add(w)
            incoming.add(r.split("<")[0])
    names = [INPUT] + [n for layer in range(c.n_layers) for n in
                       [*(f"a{layer}.h{h}" for h in range(c.n_heads[layer])), f"m{layer}"]]
    nodes = {n: {"in_graph": n in outgoing and n in incoming} for n in names}
    nodes[LOGITS] = {"in_graph": True}
    return {"cfg": cfg, "nodes": nodes, "edges": out_edges}


def save_eap_ig(path: str | Path, graph: Graph, edges, scores=None, *, d_model: int,
                split_embeds: str = "refuse") -> Path:
    p = Path(path)
    p.write_text(json.dumps(to_eap_ig(graph, edges, scores, d_model=d_model, split_embeds=split_embeds)))
    return p


def mib_eap_ig(graph: Graph, edges: Iterable[Edge | tuple[str, str]], effective: torch.Tensor, *,
               d_model: int) -> dict[str, Any]:
    """The EAP-IG object of a circuit on MIB's graph (``mib_graph``) with scores that rank the
    circuit's edges first, then every other edge by ``effective`` [E] (graph order of ``graph``;
    ``ranking.export_scores``): all distinct, also where a grouped edge becomes one edge per
    query head, so that top n by |score| is well defined for every n."""
    from .ranking import export_scores

    target, scores = scores_on_mib_graph(graph, effective)
    _, kept, _ = read_eap_ig(to_eap_ig(graph, edges, d_model=d_model), target)
    index = {e: i for i, e in enumerate(target.edges())}
    first = torch.zeros(target.n_edges, dtype=torch.bool)
    first[[index[e] for e in kept]] = True
    values = dict(zip(target.edges(), export_scores(scores, first).tolist()))
    return to_eap_ig(target, kept, values, d_model=d_model)


def scores_on_mib_graph(graph: Graph, scores: torch.Tensor, *, split_embeds: str = "refuse") -> tuple[Graph, torch.Tensor]:
    """(MIB's graph, a score per edge of it) from scores [E] on ``graph``: a grouped k/v edge's
    score goes to the readers of every head of its group; split embeddings are refused, or
    merged (input->r gets the larger of tok_embeds->r and pos_embeds->r) with ``"merge"``."""
    target = mib_graph(graph)
    if graph.config.split_embeds and split_embeds != "merge":
        raise ValueError("split_embeds: the graph has split embeddings (tok_embeds, pos_embeds) and MIB's graph one "
                         "input node; expected a graph without split embeddings, or split_embeds='merge' (input->r "
                         "takes the larger score)")
    index = {e: i for i, e in enumerate(graph.edges())}
    c = graph.config
    src: list[list[int]] = []
    for e in target.edges():
        reader = e.reader
        parts = reader.split(".")
        if len(parts) == 3 and parts[2] in "kv" and not c.kv_per_query_head:
            layer, head = int(parts[0][1:]), int(parts[1][1:])
            if c.n_kv_heads[layer] != c.n_heads[layer]:
                reader = f"a{layer}.g{head // (c.n_heads[layer] // c.n_kv_heads[layer])}.{parts[2]}"
        writers = [TOK_EMBEDS, POS_EMBEDS] if e.writer == EMBEDS and c.split_embeds else [e.writer]
        src.append([index[Edge(w, reader)] for w in writers])
    s = scores.detach().float().cpu()
    first, last = s[torch.tensor([i[0] for i in src])], s[torch.tensor([i[-1] for i in src])]
    if changed := int((first != last).sum()):
        warnings.warn(f"split_embeds='merge': {changed} input->r edges take the larger of their tok_embeds and "
                      f"pos_embeds scores", stacklevel=2)
    return target, torch.maximum(first, last)


# -- import ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EapFile:
    """A parsed EAP-IG/MIB graph file: its cfg and, per edge in file order, name, in_graph, score."""

    cfg: dict
    names: tuple[str, ...]
    in_graph: tuple[bool, ...]
    scores: tuple[float | None, ...]

    @property
    def scores_only(self) -> bool:
        """No edge in the graph: a file of importance scores (MIB's, EAP-IG's attribution output)."""
        return not any(self.in_graph)

    def order(self, absolute: bool = True) -> torch.Tensor:
        """File edge indices best first, as EAP-IG's ``apply_topn`` ranks them: descending |score|
        (or score) in float32 (their scores tensor), ties in their matrix order."""
        if any(s is None for s in self.scores):
            missing = next(nm for nm, s in zip(self.names, self.scores) if s is None)
            raise ValueError(f"edges: ranking by score needs a score on every edge; {missing!r} has none")
        L, H = _cfg_ints(self.cfg)
        s = torch.tensor(self.scores, dtype=torch.float32)
        key = s.abs() if absolute else s
        pos = torch.tensor([eap_matrix_position(L, H, nm) for nm in self.names])
        by_pos = torch.argsort(pos)  # a stable descending sort over the matrix order = their order for ties
        return by_pos[torch.sort(key[by_pos], descending=True, stable=True).indices]

    def top_n(self, n: int, absolute: bool = True) -> list[bool]:
        """in_graph of the n edges with the largest |score| (or score), EAP-IG's apply_topn order."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.names):
            raise ValueError(f"top_n: expected an int in [0, {len(self.names)}] (the file's edges), got {n!r}")
        keep = torch.zeros(len(self.names), dtype=torch.bool)
        keep[self.order(absolute)[:n]] = True
        return keep.tolist()


def parse_eap_ig(d: Any) -> EapFile:
    """Check and parse an EAP-IG/MIB object (nodes in either form); ValueError naming what is wrong."""
    if not is_eap_ig(d):
        raise ValueError("circuit: expected an EAP-IG/MIB graph object with keys 'cfg', 'nodes' and 'edges' "
                         f"(edges a dict), got keys {sorted(d) if isinstance(d, Mapping) else type(d).__name__}")
    if not isinstance(d["nodes"], Mapping):
        raise ValueError(f"nodes: expected a dict of node name -> {{'in_graph': bool}}, got {type(d['nodes']).__name__}")
    for name, node in d["nodes"].items():  # the current form (dicts) or the 2024 form (bools)
        flag = node.get("in_graph") if isinstance(node, Mapping) else node
        if not isinstance(flag, bool):
            raise ValueError(f"nodes: {name!r}: expected {{'in_graph': bool}} (or a bool, the 2024 form), got {node!r:.80}")
    names, flags, scores = [], [], []
    for name, info in d["edges"].items():
        if not isinstance(info, Mapping) or not isinstance(info.get("in_graph"), bool):
            raise ValueError(f"edges: {name!r}: expected {{'score': ..., 'in_graph': bool}}, got {info!r:.80}")
        s = info.get("score")
        if s is not None and not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)):
            raise ValueError(f"edges: {name!r}: expected a finite number as score, got {s!r}")
        names.append(name)
        flags.append(info["in_graph"])
        scores.append(None if s is None else float(s))
    return EapFile(dict(d["cfg"]), tuple(names), tuple(flags), tuple(scores))


def _group_name(graph: Graph, reader: str) -> str:
    m = _OUR_QKV.fullmatch(reader)
    if not m or m[2] != "g":
        return reader
    layer, g = int(m[1]), int(m[3])
    per = graph.config.n_heads[layer] // graph.config.n_kv_heads[layer]
    return f"KV group {g} of layer {layer} (query heads {g * per}..{(g + 1) * per - 1}, reader {reader!r})"


def read_eap_ig(d: Mapping[str, Any], graph: Graph | None = None, *, gqa: str = "strict",
                in_graph: Iterable[bool] | None = None) -> tuple[Graph, list[Edge], dict[Edge, float]]:
    """(graph, our in-graph edges in graph order, our score per edge) of an EAP-IG/MIB object.
    ``graph``: the model's graph (grouped k/v and split embeddings mapped as the module
    docstring says, ``gqa`` one of "strict", "union", "intersection"); None: the file's own.
    ``in_graph``: per file edge, overrides the file's flags (e.g. ``EapFile.top_n``)."""
    f = parse_eap_ig(d)
    if gqa not in GQA_RULES:
        raise ValueError(f"gqa: expected one of {GQA_RULES}, got {gqa!r}")
    if graph is None:
        graph = graph_from_cfg(f.cfg)
    else:
        _check_cfg(graph, f.cfg)
    flags = f.in_graph if in_graph is None else tuple(in_graph)
    votes: dict[Edge, list[tuple[bool, str]]] = {}
    scores: dict[Edge, list[float]] = {}
    for name, flag, s in zip(f.names, flags, f.scores):
        for e in edge_from_eap(graph, name):
            votes.setdefault(e, []).append((flag, name))
            if s is not None:
                scores.setdefault(e, []).append(s)
    if len(votes) != graph.n_edges:
        missing = [str(e) for e in graph.edges() if e not in votes]
        raise ValueError(f"edges: the file has {len(f.names)} edges and lacks {len(missing)} of this graph's, e.g. "
                         f"{[edge_to_eap(graph, Edge.parse(m))[0] for m in missing[:3]]}")
    if gqa == "strict":  # several votes per edge of ours only for a grouped k/v reader
        for e, v in votes.items():
            if len({flag for flag, _ in v}) > 1:
                inside = [n for flag, n in v if flag]
                outside = [n for flag, n in v if not flag]
                raise ValueError(f"edges: the query heads of {_group_name(graph, e.reader)} disagree: {inside} in the "
                                 f"circuit, {outside} not; this graph has one k/v reader per KV head. Expected a "
                                 f"per-query-head graph (kv_per_query_head=True, MIB's), or gqa='union' (keep the "
                                 f"grouped edge if any head has it) or gqa='intersection' (if all do)")
    pick = all if gqa == "intersection" else any
    order = {e: i for i, e in enumerate(graph.edges())}
    edges = sorted((e for e, v in votes.items() if pick(flag for flag, _ in v)), key=order.__getitem__)
    merge = min if gqa == "intersection" else max
    return graph, edges, {e: merge(s) for e, s in scores.items()}


def load_circuit(path: str | Path, graph: Graph | None = None, *, gqa: str = "strict", top_n: int | None = None,
                 top_percent: float | None = None) -> Circuit:
    """A circuit file in either format: ours (edgeprune_fast.circuit) or EAP-IG/MIB's graph JSON.
    A scores-only EAP-IG/MIB file needs ``top_n`` (edges) or ``top_percent`` (of the file's
    edges, floor): the top |score| edges, then EAP-IG's prune (module docstring)."""
    p = Path(path)
    d = read_circuit_json(p)
    if top_n is not None and top_percent is not None:
        raise ValueError(f"top_n, top_percent: expected at most one of them, got {top_n} and {top_percent}")
    if is_eap_ig(d):
        f = parse_eap_ig(d)
        flags, config = None, {"source": str(p), "source_format": "eap-ig"}
        if top_n is None and top_percent is None:
            if f.scores_only:
                raise ValueError(f"circuit: {str(p)!r} holds scores only (every edge has in_graph false, as MIB's "
                                 f"importance files do); expected --top-n N or --top-percent P to keep the N edges "
                                 f"(P % of its {len(f.names)} edges) with the largest |score|")
        else:
            n = top_n if top_percent is None else _percent_of(top_percent, len(f.names))
            flags = f.top_n(n)
            config["selection"] = {"rule": "top |score| then prune (EAP-IG apply_topn)", "top_n": n,
                                   "top_percent": top_percent}
        if flags is not None:  # EAP-IG's prune, on the file's own graph
            flags = _pruned_flags(d, f, flags)
        g, edges, _ = read_eap_ig(d, graph, gqa=gqa, in_graph=flags)
        return Circuit.from_edges(g, edges, config=config)
    if top_n is not None or top_percent is not None:
        raise ValueError(f"top_n: {str(p)!r} is a circuit of ours (edges without scores); --top-n/--top-percent "
                         f"apply to EAP-IG/MIB score files only")
    c = Circuit.from_dict(d, source=f"circuit {str(p)!r}")
    if graph is not None:
        if c.n_edges_total != graph.n_edges:
            raise ValueError(f"circuit: {str(p)!r} is a circuit of a graph with {c.n_edges_total} edges; expected "
                             f"this model's graph with {graph.n_edges} edges")
        for e in c.edges:
            graph.edge_index(e)
    return c


def _pruned_flags(d: Mapping[str, Any], f: EapFile, flags: list[bool]) -> list[bool]:
    """The file's flags after EAP-IG's prune on the file's graph (one input node, k/v per head)."""
    from .ranking import prune

    file_graph = graph_from_cfg(f.cfg)
    _, edges, _ = read_eap_ig(d, file_graph, in_graph=flags)
    index = {e: i for i, e in enumerate(file_graph.edges())}
    keep = torch.zeros(file_graph.n_edges, dtype=torch.bool)
    keep[[index[e] for e in edges]] = True
    kept = prune(file_graph, keep)
    names = {n for e, k in zip(file_graph.edges(), kept.tolist()) if k for n in edge_to_eap(file_graph, e)}
    return [n in names for n in f.names]


def _percent_of(percent: float, n: int) -> int:
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
        raise ValueError(f"top_percent: expected a number in [0, 100], got {percent!r}")
    return int(percent / 100 * n)
