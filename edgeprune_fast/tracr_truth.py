"""Ground-truth circuits of tracr models, derived from the compiled program's dependency graph.

A tracr model's residual stream is labelled: every dimension belongs to one SOp (``tokens``,
``indices``, ``one``, or a program variable; ``residual_stream.labels`` / ``groups`` in the
config). The compiler writes each SOp with exactly one block and lets each block read only
the SOps it computes from, so the weights are the program's dependency graph:

1. **Reads and writes** (:func:`component_io`): a reader reads the dimensions where its input
   weights are non-zero (rows of ``W_Q[h]`` / ``W_K[h]`` / ``W_V[h]`` for ``a{l}.h{h}.q/.k/.v``,
   of ``W_in`` for ``m{l}``, of ``W_U`` for ``resid_post``); a writer writes the dimensions
   where its output weights are non-zero (columns of ``W_O[h]``, ``W_out``; ``W_tok`` for the
   token embedding, which writes ``tokens`` and ``one``; ``W_pos`` for the position embedding,
   which writes ``indices``; their union for the one ``embeds`` node).
2. **Dependency edges** (:func:`dependency_edges`): ``(w, r)`` of the graph where ``w`` writes a
   dimension ``r`` reads, with the SOps that carry it.
3. **Inert dependencies removed** (:func:`derive_ground_truth`): a dependency can be inert
   under zero ablation, e.g. the query and key of an all-true selector (``Select(.., TRUE)``,
   as in ``length``): with q or k zeroed every key gets the same score, which is what the
   all-true selector computes anyway. Greedily, in graph order and repeated until nothing
   changes, an edge is removed while every output value at every non-BOS position of the
   ground-truth example sets stays within ``tol`` (1e-3) of the full model's. What is left is
   sufficient (verified), and removing any one of its edges moves some output by more than
   ``tol`` (verified, with the number of examples whose *decoded* output changes).

The derivation uses the examples marked ``use_for_ground_truth_test`` (the sets
TRACR_DEFAULTS trains on), since which dependencies matter can depend on the inputs (see
the ``reverse`` export's notes about length 5). On the shipped ``reverse`` it reproduces
ACDC's canonical circuit in both embedding modes (tests/test_tracr_suite.py).

``python -m edgeprune_fast.tracr_truth DIR [NAME ...]`` writes ``<name>.ground_truth.json``
for the models in DIR (default: every model whose ground-truth file is missing or was
written by this module; the shipped ``reverse`` keeps ACDC's file).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .graph import EMBEDS, POS_EMBEDS, RESID_POST, TOK_EMBEDS
from .models.tracr import Edge, TracrTransformer
from .tracr import TracrExampleSet, load_examples, load_tracr

DERIVED_BY = "edgeprune_fast.tracr_truth"
TOLERANCE = 1e-3
_NONZERO = 1e-9


def _rows(w: torch.Tensor) -> set[int]:
    """Residual dims (rows of a [D, n] matrix) with a non-zero weight."""
    return set(torch.nonzero(w.abs().amax(-1) > _NONZERO).flatten().tolist())


def component_io(model: TracrTransformer) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """({writer: dims written}, {reader: dims read}) for both embedding modes' writers."""
    writes: dict[str, set[int]] = {TOK_EMBEDS: _rows(model.embed.W_tok.T), POS_EMBEDS: _rows(model.embed.W_pos.T)}
    writes[EMBEDS] = writes[TOK_EMBEDS] | writes[POS_EMBEDS]
    reads: dict[str, set[int]] = {}
    for i, block in enumerate(model.blocks):
        at = block.attn
        for h in range(at.n_heads):
            writes[f"a{i}.h{h}"] = _rows(at.W_O[h].T) | _rows(at.b_O[:, None] / at.n_heads)
            for c, w in (("q", at.W_Q[h]), ("k", at.W_K[h]), ("v", at.W_V[h])):
                reads[f"a{i}.h{h}.{c}"] = _rows(w)
        reads[f"m{i}"] = _rows(block.mlp.W_in)
        writes[f"m{i}"] = _rows(block.mlp.W_out.T) | _rows(block.mlp.b_out[:, None])
    reads[RESID_POST] = _rows(model.unembed.W_U)
    return writes, reads


def sop_of(model: TracrTransformer) -> list[str]:
    """The SOp (group) of every residual dimension, from the config's residual_stream."""
    rs = model.config.raw.get("residual_stream", {})
    labels = rs.get("labels")
    if not labels or len(labels) != model.config.d_model:
        raise ValueError(f"{model.config.name}: the config's 'residual_stream.labels' must name all "
                         f"{model.config.d_model} residual dimensions to derive a ground truth")
    by_dim = [str(lab).split(":", 1)[0] for lab in labels]
    for group, dims in (rs.get("groups") or {}).items():
        for d in dims:
            by_dim[d] = group
    return by_dim


def dependency_edges(model: TracrTransformer, split_embeds: bool = False) -> dict[Edge, list[str]]:
    """{(writer, reader): SOps the writer writes and the reader reads}, in graph order."""
    writes, reads = component_io(model)
    sop = sop_of(model)
    out = {}
    for w, r in model.full_graph_edges(split_embeds):
        shared = writes[w] & reads[r]
        if shared:
            out[(w, r)] = sorted({sop[d] for d in shared})
    return out


def _stack(sets: Sequence[TracrExampleSet]) -> list[torch.Tensor]:
    return [s.input_ids for s in sets]


@dataclass
class Derivation:
    """One embedding mode's result of :func:`derive_ground_truth`."""

    edges: list[Edge]
    dependency: dict[Edge, list[str]]
    inert: list[Edge]
    sufficient: bool
    max_abs_output_diff: float
    per_edge_removal: dict[Edge, dict[str, Any]] = field(default_factory=dict)

    @property
    def every_edge_necessary(self) -> bool:
        return all(v["max_abs_output_diff"] > TOLERANCE for v in self.per_edge_removal.values())


def derive_ground_truth(model: TracrTransformer, sets: Sequence[TracrExampleSet], split_embeds: bool = False,
                        tol: float = TOLERANCE) -> Derivation:
    """The dependency edges minus the inert ones (module docstring), verified on ``sets``."""
    if not sets:
        raise ValueError("sets: expected at least one example set to derive the ground truth on, got none")
    inputs = _stack(sets)
    with torch.no_grad():
        full = [model(ids)[:, 1:] for ids in inputs]

        def outputs(kept: Iterable[Edge]) -> list[torch.Tensor]:
            kept = list(kept)
            return [model.forward_with_circuit(ids, kept, split_embeds=split_embeds)[:, 1:] for ids in inputs]

        def diff(kept: Iterable[Edge]) -> float:
            return max(float((o - f).abs().max()) for o, f in zip(outputs(kept), full))

        dependency = dependency_edges(model, split_embeds)
        kept = list(dependency)
        inert: list[Edge] = []
        changed = True
        while changed:
            changed = False
            for e in list(kept):
                trial = [x for x in kept if x != e]
                if diff(trial) <= tol:
                    kept, changed = trial, True
                    inert.append(e)
        d_all = diff(kept)
        decoded_ok = _decoded_changes(model, outputs(kept), full) == 0
        per_edge = {}
        for e in kept:
            trial = [x for x in kept if x != e]
            outs = outputs(trial)
            per_edge[e] = {"max_abs_output_diff": max(float((o - f).abs().max()) for o, f in zip(outs, full)),
                           "n_examples_changed": _decoded_changes(model, outs, full)}
    return Derivation(edges=kept, dependency=dependency, inert=inert, sufficient=d_all <= tol and decoded_ok,
                      max_abs_output_diff=d_all, per_edge_removal=per_edge)


def _decoded_changes(model: TracrTransformer, outs: Sequence[torch.Tensor], full: Sequence[torch.Tensor],
                     value_tolerance: float = TOLERANCE) -> int:
    """Examples whose decoded output (argmax; numerical: value within the tolerance) differs."""
    n = 0
    for o, f in zip(outs, full):
        if model.config.output_kind == "categorical":
            n += int((o.argmax(-1) != f.argmax(-1)).any(-1).sum())
        else:
            n += int(((o[..., 0] - f[..., 0]).abs() > value_tolerance).any(-1).sum())
    return n


def ground_truth_sets(examples: dict[str, TracrExampleSet]) -> list[TracrExampleSet]:
    """The sets marked ``use_for_ground_truth_test`` (else all): what the truth is derived on."""
    return [s for s in examples.values() if s.use_for_ground_truth_test] or list(examples.values())


def ground_truth_json(model: TracrTransformer, examples: dict[str, TracrExampleSet]) -> dict[str, Any]:
    """The ``<name>.ground_truth.json`` payload (the shared format's keys) for both embedding modes."""
    sets = ground_truth_sets(examples)
    one, split = derive_ground_truth(model, sets, False), derive_ground_truth(model, sets, True)

    def pairs(edges: Iterable[Edge]) -> list[list[str]]:
        return [list(e) for e in edges]

    def mode(d: Derivation) -> dict[str, Any]:
        return {"dependency_edges": [[w, r, sops] for (w, r), sops in d.dependency.items()],
                "inert_dependencies_removed": pairs(d.inert), "sufficient": d.sufficient,
                "max_abs_output_diff": d.max_abs_output_diff, "every_edge_necessary": d.every_edge_necessary,
                "per_edge_removal": {f"{w}->{r}": v for (w, r), v in d.per_edge_removal.items()}}

    nodes = sorted({n for e in one.edges for n in e})
    alternatives = {}
    merged = list(dict.fromkeys((EMBEDS if w in (TOK_EMBEDS, POS_EMBEDS) else w, r) for w, r in split.edges))
    if set(merged) != set(one.edges):  # another minimal circuit: is it exact too?
        with torch.no_grad():
            worst = max(float((model.forward_with_circuit(s.input_ids, merged)[:, 1:] - model(s.input_ids)[:, 1:])
                              .abs().max()) for s in sets)
        alternatives["split_embeds_derivation_merged"] = {
            "edges": [list(e) for e in merged], "max_abs_output_diff": worst, "sufficient": worst <= TOLERANCE,
            "note": "the split-embeddings derivation with tok/pos merged into embeds; it differs from 'edges', so "
                    "the greedy removal found two different minimal circuits (both within the tolerance when "
                    "'sufficient'): the ground truth of this program is not unique under zero ablation"}
    return {
        "model": model.config.name,
        "node_naming": {"writers": "embeds (split: tok_embeds written token_embeds, pos_embeds), a{l}.h{h}, m{l}",
                        "readers": "a{l}.h{h}.q / .k / .v, m{l}, resid_post", "edge": "[writer, reader]"},
        "ablation": "zero (removed edges contribute 0 to the reader's input)",
        "edges": pairs(one.edges), "n_edges": len(one.edges),
        "edges_split_embeds": pairs((("token_embeds" if w == TOK_EMBEDS else w), r) for w, r in split.edges),
        "n_edges_split_embeds": len(split.edges), "nodes_in_circuit": nodes,
        "full_graph": {"n_edges": len(model.full_graph_edges(False)),
                       "n_edges_split_embeds": len(model.full_graph_edges(True))},
        "alternative_ground_truths": alternatives,
        "derived_by": DERIVED_BY,
        "derivation": {"rule": "dependency graph of the compiled weights (a writer writes a residual dimension "
                               "the reader's input weights read), minus dependencies whose removal keeps every "
                               f"output within {TOLERANCE} (greedy, graph order, until stable)",
                       "example_sets": [s.name for s in sets], "tolerance": TOLERANCE,
                       "one_embeds_node": mode(one), "split_embeds": mode(split)},
    }


def _models(directory: Path) -> list[str]:
    return sorted(p.name[: -len(".config.json")] for p in directory.glob("*.config.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeprune_fast.tracr_truth", description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("names", nargs="*", help="default: every model whose ground truth is missing or derived here")
    args = ap.parse_args(argv)
    names = args.names or [n for n in _models(args.directory)
                           if not (f := args.directory / f"{n}.ground_truth.json").is_file()
                           or json.loads(f.read_text()).get("derived_by") == DERIVED_BY]
    for name in names:
        model = load_tracr(args.directory, name)
        payload = ground_truth_json(model, load_examples(args.directory, name))
        (args.directory / f"{name}.ground_truth.json").write_text(json.dumps(payload, indent=1) + "\n")
        d = payload["derivation"]
        print(f"{name}: {payload['n_edges']} of {payload['full_graph']['n_edges']} edges "
              f"({len(d['one_embeds_node']['dependency_edges'])} dependencies), split embeds "
              f"{payload['n_edges_split_embeds']} of {payload['full_graph']['n_edges_split_embeds']}; sufficient "
              f"{d['one_embeds_node']['sufficient']}/{d['split_embeds']['sufficient']}, every edge necessary "
              f"{d['one_embeds_node']['every_edge_necessary']}/{d['split_embeds']['every_edge_necessary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
