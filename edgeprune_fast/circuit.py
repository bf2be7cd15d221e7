"""From learned masks to a binary circuit: exact-count discretisation, evaluation, JSON files.

Discretisation (ARCHITECTURE.md §2). Inputs, in graph order (``Graph.edges()``):

    edge_scores   [E] float   every edge's log_alpha (EdgeMasks.edge_scores())
    node_scores   [W] float   every writer's log_alpha, or None without node masks
    writer_index  [E] int64   the writer slot of every edge (EdgeMasks.writer_index())

A writer is *kept* when its node log_alpha is above ``node_threshold`` (default 0: the
deterministic node mask is above 1/2); an edge is a *candidate* only when its writer is
kept. The target sparsity s gives the number of kept edges k = round((1 - s) * E)
(clamped to [0, E]: targets in [1, 2) keep none). The threshold t is the k-th largest
candidate score: the candidate scores are sorted once, t is read at its rank, and a binary
search on the sorted scores (``torch.searchsorted``) counts the candidates strictly above
it. This is where a binary search on the threshold converges, found exactly: t is always
one of the scores, whereas a bisection on floats can stop between tied or close scores
and miss the count. Edges strictly above t are kept, and the ties at t are filled in graph
order (earlier edge first) until exactly k are kept, so the count is always exact and the
result deterministic. Fewer than k candidates is an error (the node masks removed too
much), never a silently smaller circuit.

Evaluation: the circuit is set on the model (every mask exactly 0 or 1, node masks
ignored) and compared with the full model (the plain HF forward) and the empty circuit
(every edge ablated) on a task's batches:

    kl            KL(p_full || p_circuit) at the task's target positions (task.loss)
    metric_*      the task's metric averaged over examples, for circuit / full / empty
    faithfulness  (metric(circuit) - metric(empty)) / (metric(full) - metric(empty)); NaN (null
                  in files) when full and empty agree

Our JSON circuit file::

    {"format": "edgeprune_fast.circuit", "version": 1,
     "edges": [["embeds", "a0.h1.q"], ...], "nodes": ["embeds", "a0.h1", "a0.h1.q", ...],
     "n_edges": 10, "n_edges_total": 32491, "sparsity": 0.9997,
     "metrics": {...}, "config": {...}, "graph": {...GraphConfig...}}

The EAP-IG / MIB graph format is in formats.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .graph import Edge, Graph, GraphConfig

FORMAT = "edgeprune_fast.circuit"


# -- discretisation ------------------------------------------------------------------------------
def kept_count(target_sparsity: float, n_edges: int) -> int:
    """k = round((1 - s) * n_edges), clamped to [0, n_edges]; ValueError outside [0, 2)."""
    if not isinstance(target_sparsity, (int, float)) or not (0.0 <= float(target_sparsity) < 2.0):
        raise ValueError(f"sparsity: expected a number in [0, 2), got {target_sparsity!r}")
    return min(n_edges, max(0, round((1.0 - float(target_sparsity)) * n_edges)))


@dataclass(frozen=True)
class Discretisation:
    """keep [E] bool (graph order); threshold: the edge score t; ties_kept / ties_dropped: edges
    with score exactly t that were kept / left out (graph order decides); n_candidates: edges
    whose writer is kept."""

    keep: torch.Tensor
    threshold: float
    ties_kept: int
    ties_dropped: int
    n_candidates: int
    node_threshold: float

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def discretise(edge_scores: torch.Tensor, n_keep: int, *, node_scores: torch.Tensor | None = None,
               writer_index: torch.Tensor | None = None, node_threshold: float = 0.0) -> Discretisation:
    """Keep exactly ``n_keep`` edges: the highest-scoring edges whose writer is kept (see the
    module docstring); ties at the threshold are broken by graph order."""
    if not isinstance(edge_scores, torch.Tensor) or edge_scores.dim() != 1:
        raise ValueError(f"edge_scores: expected a 1-d tensor [n_edges], got {edge_scores!r:.80}")
    E = edge_scores.numel()
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= E:
        raise ValueError(f"n_keep: expected an int in [0, {E}], got {n_keep!r}")
    scores = edge_scores.detach().float().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("edge_scores: expected finite scores, got NaN or inf (did training diverge?)")
    candidate = torch.ones(E, dtype=torch.bool)
    if node_scores is not None:
        if writer_index is None or tuple(writer_index.shape) != (E,):
            raise ValueError(f"writer_index: expected an int tensor [{E}] (the writer slot of every edge) with "
                             f"node_scores, got {writer_index!r:.80}")
        node_keep = node_scores.detach().float().cpu() > node_threshold
        candidate = node_keep[writer_index.cpu().long()]
    n_cand = int(candidate.sum())
    if n_cand < n_keep:
        raise ValueError(f"sparsity: the target keeps {n_keep} edges but only {n_cand} edges have a kept writer "
                         f"(node log_alpha > node_threshold={node_threshold}); expected a target sparsity of at least "
                         f"{1 - n_cand / max(E, 1):.6f} or a lower node_threshold")
    keep = torch.zeros(E, dtype=torch.bool)
    if n_keep == 0:
        return Discretisation(keep, math.inf, 0, 0, n_cand, node_threshold)
    cand_idx = candidate.nonzero().squeeze(1)
    ascending = scores[cand_idx].sort().values
    # binary search: t = the n_keep-th largest candidate score; count(score > t) <= n_keep - 1
    t = ascending[n_cand - n_keep]
    n_above = n_cand - int(torch.searchsorted(ascending, t, right=True))
    keep[cand_idx[scores[cand_idx] > t]] = True
    ties = cand_idx[scores[cand_idx] == t]  # graph order (nonzero is sorted)
    n_ties = n_keep - n_above
    keep[ties[:n_ties]] = True
    return Discretisation(keep, float(t), n_ties, len(ties) - n_ties, n_cand, node_threshold)


# -- the circuit value -----------------------------------------------------------------------------
def _graph_from_dict(d: Mapping[str, Any] | None) -> Graph | None:
    if d is None:
        return None
    return Graph(GraphConfig.from_dict(d))


def circuit_nodes(graph: Graph | None, edges: Iterable[Edge]) -> tuple[str, ...]:
    """Names of the nodes the edges touch: writers (residual order), then readers (graph order)."""
    edges = list(edges)
    ws, rs = {e.writer for e in edges}, {e.reader for e in edges}
    if graph is None:
        names = [*sorted(ws), *sorted(rs)]
    else:
        names = [n for n in graph.writer_names() if n in ws] + [n for n in graph.reader_names() if n in rs]
    return tuple(dict.fromkeys(names))  # an MLP is a writer and a reader of the same name: list it once


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (strict JSON has neither), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass(frozen=True)
class Circuit:
    """A binary circuit: its edges (``(writer, reader)`` pairs, graph order), the nodes they
    touch, the size of the full graph, its exact sparsity, evaluation metrics and the
    config that produced it. ``graph`` (GraphConfig as a dict) lets files be checked
    against a model and drawn without one."""

    edges: tuple[tuple[str, str], ...]
    nodes: tuple[str, ...]
    n_edges_total: int
    sparsity: float
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] | None = None

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_list(self) -> list[Edge]:
        return [Edge(w, r) for w, r in self.edges]

    def get_graph(self) -> Graph | None:
        return _graph_from_dict(self.graph)

    @classmethod
    def from_edges(cls, graph: Graph, edges: Iterable[str | Sequence[str] | Edge], *, metrics=None,
                   config=None) -> Circuit:
        """A circuit of the given edges (ValueError naming an unknown edge), in graph order."""
        if isinstance(edges, (str, Edge)):
            raise ValueError(f"edges: expected a list of edges, got a single edge {edges!r}")
        order = {e: i for i, e in enumerate(graph.edges())}
        parsed = set()
        for e in edges:
            graph.edge_index(e)  # raises a ValueError naming the edge
            parsed.add(Edge.parse(e))
        es = sorted(parsed, key=order.__getitem__)
        return cls(tuple((e.writer, e.reader) for e in es), circuit_nodes(graph, es), graph.n_edges,
                   1.0 - len(es) / graph.n_edges, dict(metrics or {}), dict(config or {}),
                   json.loads(graph.signature()))

    @classmethod
    def from_masks(cls, masks, sparsity: float | None, *, node_threshold: float | None = None,
                   config=None) -> Circuit:
        """Discretise an EdgeMasks (or an EdgePrunedModel's masks) at the target ``sparsity``:
        exactly round((1 - sparsity) * n_edges) edges whose writer's node log_alpha is above
        ``node_threshold`` (default 0; see the module docstring). ``sparsity=None``: let the
        masks decide: the edges whose deterministic mask and writer's node mask are non-zero
        (log_alpha above log(-l/r); node_threshold defaults to that too)."""
        masks = getattr(masks, "masks", masks)
        graph: Graph = masks.graph
        scores, nodes, writer = masks.edge_scores(), masks.node_scores(), masks.writer_index()
        if sparsity is None:
            cut = float(masks.params.log_ratio)
            node_threshold = cut if node_threshold is None else node_threshold
            alive = scores > cut
            if nodes is not None:
                alive &= (nodes > node_threshold)[writer]
            k = int(alive.sum())
        else:
            node_threshold = 0.0 if node_threshold is None else node_threshold
            k = kept_count(sparsity, graph.n_edges)
        d = discretise(scores, k, node_scores=nodes, writer_index=writer, node_threshold=node_threshold)
        all_edges = graph.edges()
        es = [all_edges[i] for i in d.keep.nonzero().squeeze(1).tolist()]
        cfg = dict(config or {})
        cfg["discretisation"] = {"rule": "masks (z_det > 0)" if sparsity is None else "exact count",
                                 "target_sparsity": sparsity, "n_keep": k, "threshold": d.threshold,
                                 "ties_kept": d.ties_kept, "ties_dropped": d.ties_dropped,
                                 "node_threshold": node_threshold, "n_candidates": d.n_candidates}
        return cls(tuple((e.writer, e.reader) for e in es), circuit_nodes(graph, es), graph.n_edges,
                   1.0 - len(es) / graph.n_edges, {}, cfg, json.loads(graph.signature()))

    def with_metrics(self, metrics: Mapping[str, Any]) -> Circuit:
        return replace(self, metrics={**self.metrics, **metrics})

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "edges": [list(e) for e in self.edges], "nodes": list(self.nodes),
                "n_edges": self.n_edges, "n_edges_total": self.n_edges_total, "sparsity": self.sparsity,
                "metrics": _json_safe(self.metrics), "config": _json_safe(self.config), "graph": self.graph}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "circuit") -> Circuit:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"{source}: expected an edgeprune_fast circuit (a JSON object with \"format\": "
                             f"\"{FORMAT}\"), got {str(d)[:120]!r}")
        for key in ("edges", "n_edges_total", "sparsity"):
            if key not in d:
                raise ValueError(f"{source}: missing key {key!r}")
        edges = []
        for e in d["edges"]:
            try:
                pe = Edge.parse(e)
            except ValueError:
                raise ValueError(f"{source}: edges: expected [writer, reader] pairs, got {e!r}") from None
            edges.append((pe.writer, pe.reader))
        graph = _graph_from_dict(d.get("graph"))
        if graph is not None:
            if graph.n_edges != int(d["n_edges_total"]):
                raise ValueError(f"{source}: n_edges_total is {d['n_edges_total']} but its graph has {graph.n_edges}")
            for e in edges:
                graph.edge_index(e)
        nodes = tuple(d.get("nodes") or circuit_nodes(graph, [Edge(*e) for e in edges]))
        return cls(tuple(edges), nodes, int(d["n_edges_total"]), float(d["sparsity"]), dict(d.get("metrics") or {}),
                   dict(d.get("config") or {}), d.get("graph"))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Our JSON circuit file (for EAP-IG/MIB files see formats.load_circuit)."""
        return cls.from_dict(read_circuit_json(path), source=f"circuit {str(path)!r}")


def read_circuit_json(path: str | Path) -> dict:
    """The parsed JSON of a circuit file, in either format; ValueError naming a missing or invalid file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"circuit: expected a circuit JSON file, got {str(p)!r} (no such file)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"circuit: {str(p)!r} is not valid JSON ({exc})") from None


# -- evaluation -----------------------------------------------------------------------------------
@contextmanager
def circuit_set(model, edges: Iterable[str | Sequence[str] | Edge]) -> Iterator[None]:
    """Fix the model's masks to ``edges`` (exactly 0/1) inside the block; restore afterwards."""
    masks = model.masks
    previous = masks.circuit
    masks.set_circuit(edges)
    try:
        yield
    finally:
        masks.circuit = previous


def faithfulness(metric_circuit: float, metric_full: float, metric_empty: float) -> float:
    """(m(circuit) - m(empty)) / (m(full) - m(empty)); NaN when full and empty agree."""
    denom = metric_full - metric_empty
    return float("nan") if denom == 0 else (metric_circuit - metric_empty) / denom


@torch.no_grad()
def evaluate(model, edges: Iterable[str | Sequence[str] | Edge], batches: Sequence, *,
             loss_fn: Callable | None = None, metric_fn: Callable | None = None,
             metrics_fn: Callable | None = None) -> dict[str, Any]:
    """KL and metric of the binary circuit ``edges`` against the full model and the empty circuit.

    ``batches``: task batches (input_ids, corrupted_input_ids, attention_mask, target_mask, ...);
    ``loss_fn(circuit_logits, full_logits, batch)``: the divergence (default: KL at the target
    positions, tasks.base.kl_loss); ``metric_fn(logits, batch) -> [B]``: the task metric (None:
    KL only); ``metrics_fn(logits, batch) -> {name: [B]}``: every measure the task reports,
    averaged into ``out["measures"][name] = {"circuit", "full", "empty"}``. Averages are over
    examples (KL: weighted by each batch's number of examples)."""
    from .tasks.base import kl_loss

    loss_fn = loss_fn or kl_loss
    edges = list(edges)
    if len(batches) == 0:
        raise ValueError("batches: expected at least one evaluation batch, got none")
    sums = {"kl": 0.0, "kl_empty": 0.0, "metric_circuit": 0.0, "metric_full": 0.0, "metric_empty": 0.0}
    measures: dict[str, dict[str, float]] = {}
    n = 0
    for batch in batches:
        full_logits, _ = model.reference(batch.input_ids, batch.attention_mask, states=False)
        corrupted = None
        if model.ablation == "corrupted":
            if batch.corrupted_input_ids is None:
                raise ValueError("batches: corrupted ablation needs corrupted_input_ids in every batch, got None")
            corrupted = model.reference(batch.corrupted_input_ids, batch.attention_mask, logits=False)[1]
        kw = dict(attention_mask=batch.attention_mask, corrupted_writers=corrupted, training=False)
        with circuit_set(model, edges):
            circ = model(batch.input_ids, **kw).logits
        with circuit_set(model, []):
            empty = model(batch.input_ids, **kw).logits
        b = len(batch)
        n += b
        sums["kl"] += float(loss_fn(circ, full_logits, batch)) * b
        sums["kl_empty"] += float(loss_fn(empty, full_logits, batch)) * b
        if metric_fn is not None:
            sums["metric_circuit"] += float(metric_fn(circ, batch).float().sum())
            sums["metric_full"] += float(metric_fn(full_logits, batch).float().sum())
            sums["metric_empty"] += float(metric_fn(empty, batch).float().sum())
        if metrics_fn is not None:
            for which, logits in (("circuit", circ), ("full", full_logits), ("empty", empty)):
                for name, v in metrics_fn(logits, batch).items():
                    row = measures.setdefault(name, {"circuit": 0.0, "full": 0.0, "empty": 0.0})
                    row[which] += float(v.float().sum())
    out: dict[str, Any] = {k: v / n for k, v in sums.items()}
    if metric_fn is None:
        for k in ("metric_circuit", "metric_full", "metric_empty"):
            out.pop(k)
    else:
        out["faithfulness"] = faithfulness(out["metric_circuit"], out["metric_full"], out["metric_empty"])
    if metrics_fn is not None:
        out["measures"] = {name: {k: v / n for k, v in row.items()} for name, row in measures.items()}
    out["n_examples"] = n
    return out


def evaluate_circuit(model, circuit: Circuit, task, batches: Sequence | None = None, *, batch_size: int = 32,
                     split: str = "validation") -> Circuit:
    """``circuit`` with its metrics (see :func:`evaluate`) on ``task`` (``task.loss``/``task.metric``;
    batches default to ``task.batches(batch_size, split)``)."""
    if circuit.n_edges_total != model.graph.n_edges:
        raise ValueError(f"circuit: expected a circuit of this model's graph ({model.graph.n_edges} edges), got one "
                         f"of a graph with {circuit.n_edges_total} edges")
    batches = task.batches(batch_size, split) if batches is None else batches
    m = evaluate(model, circuit.edge_list(), batches, loss_fn=getattr(task, "loss", None),
                 metric_fn=getattr(task, "metric", None), metrics_fn=getattr(task, "metrics", None))
    m["metric_name"] = getattr(task, "metric_name", "metric")
    return circuit.with_metrics(m)

