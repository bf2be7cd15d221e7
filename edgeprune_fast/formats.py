"""The graph JSON of EAP-IG (hannamw/EAP-IG, ``Graph.to_json``/``from_json``) and of the MIB
benchmark's circuit track, both ways, and loading any circuit file.

Their file (written from the public code's description, not copied)::

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D (newer files)},
     "nodes": {"input": true, "a0.h0": false, ..., "m0": true, ..., "logits": true},
              # EAP-IG's to_json: name -> bool; MIB's loader also takes name -> {"in_graph": bool, ...}
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": true}, ..., "m2->logits": {...}}}

Their graph has one ``input`` node (no split embeddings), per-head attention nodes whose
inputs are split by query/key/value (the ``<q>``/``<k>``/``<v>`` suffix of an edge into a
head), MLP nodes and ``logits``. Its edge set is ours with these names:

    ours                          theirs
    embeds                        input
    tok_embeds, pos_embeds        input (both; see below)
    a{l}.h{h}        (writer)     a{l}.h{h}
    m{l}             (writer)     m{l}
    a{l}.h{h}.q / .k / .v         a{l}.h{h}<q> / <k> / <v>   (the reader side of an edge)
    a{l}.g{g}.k / .v (GQA)        a{l}.h{h}<k> / <v> for every query head h of KV group g
    m{l}             (reader)     m{l}
    resid_post                    logits

    edge "a0.h1->a2.h3.q"  <->  "a0.h1->a2.h3<q>";   "m1->resid_post"  <->  "m1->logits"

Grouped-query attention: their graph (MIB loads such models with TransformerLens'
``ungroup_grouped_query_attention``) has a k and a v input per *query* head; ours has one per
KV head, shared by the heads of its group. Export writes our grouped edge to every head of
the group (same score, same in_graph); import keeps our grouped edge when *any* head of the
group has it (a union, so the loaded circuit can be larger than theirs; ``strict=True``
raises instead when the heads of a group disagree). Split embeddings: export merges
``tok_embeds->r`` and ``pos_embeds->r`` into ``input->r`` (kept if either is, the larger
score); import into a split graph keeps both. Without GQA and split embeddings the mapping
is a bijection and both directions round-trip exactly.

Scores: export writes a score per edge (ours: the caller's, e.g. sigmoid of the effective
log_alpha, as MIB's own Edge Pruning export does; else 1.0 for circuit edges, 0.0 others);
import reads ``in_graph`` only (scores are returned separately by :func:`read_eap_ig`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .circuit import Circuit, read_circuit_json
from .graph import EMBEDS, POS_EMBEDS, RESID_POST, TOK_EMBEDS, Edge, Graph

INPUT, LOGITS = "input", "logits"
_EAP_READER = re.compile(r"a(\d+)\.h(\d+)<([qkv])>")
_OUR_QKV = re.compile(r"a(\d+)\.([hg])(\d+)\.([qkv])")


def is_eap_ig(d: Any) -> bool:
    """Whether a parsed JSON object looks like an EAP-IG/MIB graph (cfg, nodes, edges as a dict)."""
    return isinstance(d, Mapping) and {"cfg", "nodes", "edges"} <= set(d) and isinstance(d["edges"], Mapping)


def graph_from_cfg(cfg: Mapping[str, Any]) -> Graph:
    """Our graph for an EAP-IG cfg (one ``embeds`` writer, no GQA: their graph has neither)."""
    try:
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"cfg: expected n_layers and n_heads (ints), got {dict(cfg)!r:.200}") from None
    return Graph.build(n_layers, n_heads, parallel_mlp=bool(cfg.get("parallel_attn_mlp", False)))


def _check_cfg(graph: Graph, cfg: Mapping[str, Any]) -> None:
    c = graph.config
    heads = set(c.n_heads)
    if int(cfg.get("n_layers", -1)) != c.n_layers or heads != {int(cfg.get("n_heads", -1))}:
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
        H, K = graph.config.n_heads[layer], graph.config.n_kv_heads[layer]
        reader = f"a{layer}.h{head}.{qkv}" if qkv == "q" or H == K else f"a{layer}.g{head // (H // K)}.{qkv}"
    else:
        reader = r
    out = [Edge(x, reader) for x in writers]
    for e in out:
        graph.edge_index(e)  # ValueError naming the edge if it does not exist
    return out


# -- export ----------------------------------------------------------------------------------------
def to_eap_ig(graph: Graph, edges: Iterable[Edge | tuple[str, str]], scores: Mapping[Edge, float] | None = None,
              *, d_model: int | None = None) -> dict[str, Any]:
    """The EAP-IG/MIB JSON object of a circuit on ``graph``: every edge of the graph, with
    ``in_graph`` true on the circuit's; nodes in_graph when an in-circuit edge touches them.
    ``scores``: per edge of ours (missing: 1.0 in the circuit, 0.0 outside)."""
    c = graph.config
    if len(set(c.n_heads)) != 1:
        raise ValueError(f"graph: the EAP-IG format has one n_heads for all layers, this graph has {c.n_heads}")
    kept = {Edge.parse(e) for e in edges}
    cfg: dict[str, Any] = {"n_layers": c.n_layers, "n_heads": c.n_heads[0], "parallel_attn_mlp": c.parallel_mlp}
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    out_edges: dict[str, dict[str, Any]] = {}
    nodes = {INPUT: False}
    for layer in range(c.n_layers):
        nodes.update({f"a{layer}.h{h}": False for h in range(c.n_heads[layer])})
        nodes[f"m{layer}"] = False
    nodes[LOGITS] = False
    for e in graph.edges():
        score = float(scores[e]) if scores is not None and e in scores else float(e in kept)
        for name in edge_to_eap(graph, e):
            prev = out_edges.get(name)  # split embeds / nothing else maps two of ours to one of theirs
            in_graph = e in kept or (prev is not None and prev["in_graph"])
            out_edges[name] = {"score": score if prev is None else max(score, prev["score"]), "in_graph": in_graph}
            if e in kept:
                w, r = name.split("->")
                nodes[w] = True
                nodes[r.split("<")[0]] = True
    return {"cfg": cfg, "nodes": nodes, "edges": out_edges}


def save_eap_ig(path: str | Path, graph: Graph, edges, scores=None, *, d_model: int | None = None) -> Path:
    p = Path(path)
    p.write_text(json.dumps(to_eap_ig(graph, edges, scores, d_model=d_model)))
    return p


# -- import ----------------------------------------------------------------------------------------
def read_eap_ig(d: Mapping[str, Any], graph: Graph | None = None, *,
                strict: bool = False) -> tuple[Graph, list[Edge], dict[Edge, float]]:
    """(graph, our in-graph edges in graph order, our score per edge) of an EAP-IG/MIB object.
    ``graph``: the model's graph (GQA and split embeddings mapped as the docstring says);
    None: built from the file's cfg."""
    if not is_eap_ig(d):
        raise ValueError("circuit: expected an EAP-IG/MIB graph object with keys 'cfg', 'nodes' and 'edges' "
                         f"(edges a dict), got keys {sorted(d) if isinstance(d, Mapping) else type(d).__name__}")
    if graph is None:
        graph = graph_from_cfg(d["cfg"])
    else:
        _check_cfg(graph, d["cfg"])
    kept: dict[Edge, set[bool]] = {}
    scores: dict[Edge, float] = {}
    for name, info in d["edges"].items():
        if not isinstance(info, Mapping) or "in_graph" not in info:
            raise ValueError(f"edges: {name!r}: expected {{'score': ..., 'in_graph': bool}}, got {info!r:.80}")
        for e in edge_from_eap(graph, name):
            kept.setdefault(e, set()).add(bool(info["in_graph"]))
            s = info.get("score")
            if s is not None:
                scores[e] = max(float(s), scores.get(e, float("-inf")))
    if strict:
        if split := [str(e) for e, v in kept.items() if len(v) > 1]:
            raise ValueError(f"edges: the heads of a KV group disagree on {len(split)} grouped edges, e.g. "
                             f"{split[:3]} (strict=True; the default keeps a grouped edge if any head has it)")
    order = {e: i for i, e in enumerate(graph.edges())}
    edges = sorted((e for e, v in kept.items() if True in v), key=order.__getitem__)
    return graph, edges, scores


def load_circuit(path: str | Path, graph: Graph | None = None) -> Circuit:
    """A circuit file in either format: ours (edgeprune_fast.circuit) or EAP-IG/MIB's graph JSON."""
    p = Path(path)
    d = read_circuit_json(p)
    if is_eap_ig(d):
        g, edges, _ = read_eap_ig(d, graph)
        return Circuit.from_edges(g, edges, config={"source": str(p), "source_format": "eap-ig"})
    c = Circuit.from_dict(d, source=f"circuit {str(p)!r}")
    if graph is not None:
        if c.n_edges_total != graph.n_edges:
            raise ValueError(f"circuit: {str(p)!r} is a circuit of a graph with {c.n_edges_total} edges; expected "
                             f"this model's graph with {graph.n_edges} edges")
        for e in c.edges:
            graph.edge_index(e)
    return c
