"""Faithfulness at MIB's edge budgets, CPR and CMD, with the fused kernels.

Input: an order of every edge of MIB's graph (best first) and a model whose graph *is* MIB's
(``EdgePrunedModel(..., kv_per_query_head=True)``, one embedding writer; ``formats.mib_graph``).
The order comes from a score file (``order_from_file``: EAP-IG's ``apply_topn`` order, by
|score| or by signed score) or from a prune run's masks (``order_from_masks``: the effective
log_alpha, ``ranking.py``, with the scores of a grouped run copied to the k/v readers of every
head of the group). For each budget the circuit is the first ``int(p * n_edges)`` edges of the
order, pruned as EAP-IG's ``evaluate_graph`` prunes (``ranking.prune``) under MIB's conventions.

One pass over the data evaluates every budget: per batch, the full model's logits (plain
forward), the corrupted run's writer states (captured once, reused by every circuit), the
empty circuit, then one edge-pruned forward per budget with its 0/1 masks set from a
precomputed tensor (no Python per edge). MIB's own loop (``evaluate_area_under_curve``) runs,
for every budget and batch, a hooked corrupted forward and a hooked clean forward whose hooks
mix all upstream writers with einsums.

Conventions (``conventions``), where MIB's (TransformerLens + EAP-IG, checked in their code)
and ours differ; "mib" reproduces theirs:

    what               "mib" (MIB / EAP-IG)                         "edgeprune"
    prompt             BOS (or EOS) prepended (tasks.py)            the tokenizer's own special tokens
    circuit per budget top n, then EAP-IG's prune                   top n as is
    zero ablation      a removed edge carries what EAP-IG never     a removed edge carries 0
                       removes: the position embedding (their
                       input node is hook_embed, tokens only), the
                       output bias b_O and what TransformerLens
                       folds into it (fold_ln puts the input
                       LayerNorm's bias beta into b_V as beta W_V,
                       fold_value_biases moves b_V W_O into b_O)
    corrupted          the corrupted run's writer (the same)        the same
    mean ablation      refused: EAP-IG's compute_mean_activations   the mean writer outputs over the
                       averages over nodes and the last position     evaluation data's real tokens
                       and runs on CUDA only
    graph              k/v readers per query head (ungrouped GQA)   the same (budgets are over MIB's count)
    post-attention     head writes z_h W_O[h]; each reader norms    head h writes its share g o_h / rms(o)
    norms (Gemma-2)    its own mix of a layer's heads                of the normed output
                       (post_norm="reader", post_norm.py)            (post_norm="writer"); --post-norm
                                                                     chooses either under both conventions

Under patching (corrupted) the constants above cancel (clean and corrupted runs share them),
so the two conventions differ only in the BOS, the prune (neutral under patching: a node
without incoming edges computes its corrupted output anyway) and, for models with
post-attention norms, the default post-norm mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..formats import edge_from_eap, parse_eap_ig, read_eap_ig, scores_on_mib_graph
from ..graph import Graph, GraphConfig
from ..ranking import effective_scores, prune, rank_order
from .budgets import CURVE_FRACTIONS, SUBMISSION_PERCENTS, area_from_1, area_under, n_at_most

CONVENTIONS = ("mib", "edgeprune")


def curve_percents() -> list[float]:
    """Every percent a report has a point for: the submission budgets and the curve's (0 ... 100)."""
    return sorted({float(p) for p in SUBMISSION_PERCENTS} | {round(100 * f, 10) for f in CURVE_FRACTIONS})


# -- orders -------------------------------------------------------------------------------------------
def order_from_file(d: Mapping[str, Any], graph: Graph, *, absolute: bool = True) -> torch.Tensor:
    """Edge indices of ``graph`` (MIB's graph) best first, from an EAP-IG/MIB score file."""
    f = parse_eap_ig(d)
    read_eap_ig(d, graph)  # checks the cfg and that the file has every edge of the graph
    index = {e: i for i, e in enumerate(graph.edges())}
    to_ours = torch.tensor([index[edge_from_eap(graph, n)[0]] for n in f.names])
    return to_ours[f.order(absolute)]


def masks_graph(path: Path) -> Graph:
    """The graph a masks file was saved for (its ``graph`` metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "graph" not in meta:
        raise ValueError(f"masks: {str(path)!r} has no graph metadata (expected a file written by save_masks)")
    return Graph(GraphConfig.from_dict(json.loads(meta["graph"])))


def order_from_masks(path: Path, graph: Graph, *, split_embeds: str = "refuse") -> tuple[torch.Tensor, torch.Tensor]:
    """(order best first, the scores it follows) of ``graph`` (MIB's) from a masks file: the
    effective log_alpha (ranking.py), ties by graph order."""
    from ..masks import EdgeMasks

    run_graph = masks_graph(path)
    from safetensors.torch import load_file

    state = load_file(str(path))
    masks = EdgeMasks(run_graph, node_masks="nodes" in state)
    masks.load(path)
    target, scores = scores_on_mib_graph(run_graph, effective_scores(masks), split_embeds=split_embeds)
    if target.signature() != graph.signature():
        raise ValueError(f"masks: {str(path)!r} holds masks of {run_graph.signature()}, whose MIB graph is not this "
                         f"model's ({graph.signature()})")
    return rank_order(scores), scores


# -- circuits per budget --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    percent: float
    n_edges: int  # at most this many (MIB's int(p * n))
    keep: torch.Tensor  # [E] bool, the circuit evaluated (after prune when asked)

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def budgets(graph: Graph, order: torch.Tensor, percents: Sequence[float], *, pruned: bool) -> list[Budget]:
    """The circuit at each percent: the first int(p/100 * n_edges) edges of ``order``, pruned or not."""
    E = graph.n_edges
    if tuple(order.shape) != (E,) or not torch.equal(torch.sort(order).values, torch.arange(E)):
        raise ValueError(f"order: expected a permutation of the graph's {E} edges, got {order!r:.80}")
    out = []
    for p in percents:
        fraction = next((f for f in CURVE_FRACTIONS if math.isclose(100 * f, p)), p / 100)  # MIB's own literals
        n = n_at_most(fraction, E)
        keep = torch.zeros(E, dtype=torch.bool)
        keep[order[:n]] = True
        out.append(Budget(float(p), n, prune(graph, keep) if pruned else keep))
    return out


def _circuit_masks(graph: Graph, keep: torch.Tensor, device) -> list[torch.Tensor]:
    return [keep[g.offset:g.offset + g.n_edges].view(len(g.readers), g.n_upstream).float().to(device)
            for g in graph.groups]


# -- MIB's zero ablation -----------------------------------------------------------------------------------
@torch.no_grad()
def mib_zero_writers(model, n_positions: int) -> torch.Tensor:
    """[W, S, D]: what each writer keeps under EAP-IG's zero ablation (module docstring): the
    position embedding for the input node, b_O/H + (beta W_V[g] + b_V[g]) W_O[h] for head h of
    KV group g (beta: the bias of the head's input LayerNorm, none for RMSNorm), 0 for an MLP.
    Under post_norm="reader" a post-normed layer's b_O is not a head's: it enters that layer's
    norm whatever is kept (post_norm.py), so the heads keep only the value-bias part."""
    a, g = model.adapter, model.graph
    if g.config.split_embeds:
        raise ValueError("model: MIB's conventions have one input node; expected a model without split_embeds")
    out = torch.zeros(g.n_writers, n_positions, a.d_model, dtype=torch.float32, device=a.device)
    if a.embed_positions is not None:
        pos = torch.arange(n_positions, device=a.device)[None]
        out[0] = a.embed_positions(pos)[0].float()
    for layer, spec in enumerate(a.layers):
        H, K = spec.n_heads, spec.n_kv_heads
        first = g.slot(f"a{layer}.h0")
        c = torch.zeros(H, a.d_model, dtype=torch.float32, device=a.device)
        if spec.b_O is not None and not (model.post_norm == "reader" and spec.attn_post_norm is not None):
            c += spec.b_O.float() / H
        v_bias = torch.zeros(K, spec.W_V.shape[-1], dtype=torch.float32, device=a.device)
        norm_bias = getattr(spec.attn_norm, "bias", None)  # a LayerNorm's: folded into b_V by fold_ln
        if isinstance(norm_bias, torch.Tensor):
            v_bias += torch.einsum("d,kdv->kv", norm_bias.float(), spec.W_V.float())
        if spec.b_V is not None:
            v_bias += spec.b_V.float()
        c += torch.einsum("hv,hvd->hd", v_bias.repeat_interleave(H // K, 0), spec.W_O.float())
        out[first:first + H] = c[:, None, :]
    return out.to(a.dtype)


# -- the curve ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_budgets(model, circuits: Sequence[Budget], batches: Sequence, metric: Callable,
                     progress: Callable | None = None) -> dict[str, Any]:
    """Mean metric of every circuit, the full model and the empty circuit over ``batches``,
    and each circuit's faithfulness; one pass over the data (module docstring)."""
    if not batches:
        raise ValueError("batches: expected at least one evaluation batch, got none")
    g, dev = model.graph, model.adapter.device
    masks = [_circuit_masks(g, b.keep, dev) for b in circuits]
    empty = _circuit_masks(g, torch.zeros(g.n_edges, dtype=torch.bool), dev)
    sums = torch.zeros(len(circuits), dtype=torch.float64)
    full_sum = empty_sum = 0.0
    n = 0
    previous = model.masks.circuit
    try:
        for batch in batches:
            ids, mask = batch.input_ids, batch.attention_mask
            full, _ = model.reference(ids, mask, states=False)
            corrupt = None
            if model.ablation == "corrupted":
                if batch.corrupted_input_ids is None:
                    raise ValueError("batches: corrupted ablation needs corrupted_input_ids in every batch, got None")
                corrupt = model.place_corrupted_writers(model.reference(batch.corrupted_input_ids, mask,
                                                                        logits=False)[1])
            kw = dict(attention_mask=mask, corrupted_writers=corrupt, training=False)
            full_sum += float(metric(full, batch).double().sum())
            model.masks.circuit = empty
            empty_sum += float(metric(model(ids, **kw).logits, batch).double().sum())
            for i, z in enumerate(masks):
                model.masks.circuit = z
                sums[i] += float(metric(model(ids, **kw).logits, batch).double().sum())
            n += len(batch)
            if progress is not None:
                progress(len(batch))
    finally:
        model.masks.circuit = previous
    m_full, m_empty = full_sum / n, empty_sum / n
    denom = m_full - m_empty
    points = []
    for b, s in zip(circuits, (sums / n).tolist()):
        points.append({"percent": b.percent, "n_edges": b.n_edges, "n_edges_kept": b.n_kept, "metric": s,
                       "faithfulness": float("nan") if denom == 0 else (s - m_empty) / denom})
    return {"points": points, "metric_full": m_full, "metric_empty": m_empty, "n_examples": n}


def summarise(points: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """CPR, CMD and the average over MIB's curve fractions (budgets.py) from a curve's points."""
    by_percent = {round(p["percent"], 10): p["faithfulness"] for p in points}
    fs = [by_percent[round(100 * f, 10)] for f in CURVE_FRACTIONS]
    return {"cpr": area_under(fs), "cmd": area_from_1(fs), "average": sum(fs) / len(fs)}


def plot_curve(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str | None = None) -> Path:
    """Faithfulness against % of edges (log axis; the 0 % point drawn at the axis' left end)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        pts = [p for p in points if p["percent"] > 0 and math.isfinite(p["faithfulness"])]
        ax.plot([p["percent"] for p in pts], [p["faithfulness"] for p in pts], "o-", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("% of the model's edges (MIB's count), at most")
    ax.set_ylabel("faithfulness")
    ax.set_title(title or "faithfulness at MIB's edge budgets")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
