"""From learned masks to a binary circuit: exact-count discretisation, evaluation, JSON files.

Discretisation (ARCHITECTURE.md §2). Every edge gets one *effective score* (EdgeMasks.
effective_scores, graph order): min(its log_alpha, its writer's node log_alpha) (its
log_alpha without node masks). The deterministic masks multiply, z_det(edge) * z_det(node),
and z_det is monotone in log_alpha, so an edge's effective mask is non-zero exactly when
its effective score is above log(-l/r). Two rules, both a prefix of the ranking by that
score (so a scores file written from it puts the circuit first):

    exact count      the target sparsity s gives k = round((1 - s) * E) edges (clamped to
                     [0, E]): the first k edges of the ranking (ranking.rank_order: descending
                     score, ties in graph order). The threshold t, the k-th score, is where a
                     binary search on the threshold would converge, found exactly by one
                     stable sort (a bisection on floats can stop between tied or close scores
                     and miss the count); edges above t are kept, and the ties at t are taken
                     in graph order (earlier edge first) until exactly k are kept, so the count
                     is always exact and the result deterministic, whatever the node masks did
                     (a circuit of the target's size always exists).
    non-zero masks   the edges whose effective mask is non-zero (score > log(-l/r)): the masks
                     decide the size. Targets s >= 1 (the original's tracr runs train with
                     1.02 to keep pushing) keep no edge by count, so they take this rule.

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
from .ranking import rank_order

FORMAT = "edgeprune_fast.circuit"
EFFECTIVE_SCORE = "min(edge log_alpha, writer node log_alpha)"


# -- discretisation ------------------------------------------------------------------------------
def kept_count(target_sparsity: float, n_edges: int) -> int:
    """k = round((1 - s) * n_edges), clamped to [0, n_edges]; ValueError outside [0, 2)."""
    if not isinstance(target_sparsity, (int, float)) or not (0.0 <= float(target_sparsity) < 2.0):
        raise ValueError(f"sparsity: expected a number in [0, 2), got {target_sparsity!r}")
    return min(n_edges, max(0, round((1.0 - float(target_sparsity)) * n_edges)))


@dataclass(frozen=True)
class Discretisation:
    """keep [E] bool (graph order); threshold: the score t; ties_kept / ties_dropped: edges
    with score exactly t that were kept / left out (graph order decides)."""

    keep: torch.Tensor
    threshold: float
    ties_kept: int
    ties_dropped: int

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def discretise(scores: torch.Tensor, n_keep: int) -> Discretisation:
    """Keep exactly ``n_keep`` edges: the highest scores, ties at the threshold broken by
    graph order (see the module docstring)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores: expected a 1-d tensor [n_edges], got {scores!r:.80}")
    E = scores.numel()
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= E:
        raise ValueError(f"n_keep: expected an int in [0, {E}], got {n_keep!r}")
    scores = scores.detach().float().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: expected finite scores, got NaN or inf (did training diverge?)")
    keep = torch.zeros(E, dtype=torch.bool)
    if n_keep == 0:
        return Discretisation(keep, math.inf, 0, 0)
    keep[rank_order(scores)[:n_keep]] = True
    t = float(scores[keep].min())
    at_t = scores == t
    return Discretisation(keep, t, int((at_t & keep).sum()), int((at_t & ~keep).sum()))


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
    def from_masks(cls, masks, sparsity: float | None, *, config=None) -> Circuit:
        """Discretise an EdgeMasks (or an EdgePrunedModel's masks) by the effective scores
        (see the module docstring): at a target ``sparsity`` in [0, 1) exactly
        round((1 - sparsity) * n_edges) edges; ``sparsity=None`` or a target >= 1: the edges
        whose effective deterministic mask is non-zero. ``config["discretisation"]`` says
        which rule made the circuit."""
        masks = getattr(masks, "masks", masks)
        graph: Graph = masks.graph
        scores = masks.effective_scores()
        cut = float(masks.params.log_ratio)
        if sparsity is not None:
            kept_count(sparsity, graph.n_edges)  # ValueError outside [0, 2)
        if sparsity is None or sparsity >= 1:
            rule = "non-zero masks" if sparsity is None else "non-zero masks (target >= 1)"
            k = int((scores > cut).sum())
        else:
            rule, k = "exact count", kept_count(sparsity, graph.n_edges)
        d = discretise(scores, k)
        all_edges = graph.edges()
        es = [all_edges[i] for i in d.keep.nonzero().squeeze(1).tolist()]
        cfg = dict(config or {})
        cfg["discretisation"] = {"rule": rule, "score": EFFECTIVE_SCORE, "target_sparsity": sparsity, "n_keep": k,
                                 "threshold": d.threshold, "ties_kept": d.ties_kept, "ties_dropped": d.ties_dropped,
                                 "nonzero_mask_above": cut,
                                 "n_nonzero_masks": int((scores > cut).sum())}
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

