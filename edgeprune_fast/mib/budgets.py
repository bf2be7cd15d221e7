"""MIB's edge budgets and its two summary metrics, CPR and CMD (hannamw/MIB-circuit-track).

Budgets. MIB evaluates a method's scores at fixed fractions of the model's edges, counted
on MIB's graph (``formats.mib_graph``: one input node, k/v readers per query head; e.g.
32,491 edges for GPT-2 small, 179,749 for Qwen2.5-0.5B). ``MIB_evaluation.evaluate_area_under_curve``
keeps, at each fraction p of ``CURVE_FRACTIONS``, the top ``int(p * n_edges)`` edges by score
(``Graph.apply_topn``, then ``Graph.prune``), so each circuit has *at most* that many edges
("floor"; the exact-sparsity circuits of ``circuit.kept_count``, round((1 - s) n), can be one
edge over). The submission instructions (its README) ask instead for circuits of at most
``SUBMISSION_PERCENTS`` % of the edges (0 % included, 100 % not); ``n_at_most`` serves both.

Metrics (its ``evaluate_area_under_curve``; the paper's "circuit performance ratio" and
"circuit-model distance"), with f_i the faithfulness at x_i = CURVE_FRACTIONS[i] (a fraction,
not a percent; x runs from 0.001 to 1, linear, no normalisation)::

    faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty))     (m: mean logit difference)
    CPR = area_under  = sum_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2                 (higher is better)
    CMD = area_from_1 = sum_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2     (lower is better)

Its ``print_results.py`` reports CPR from the curve ranked by signed score (``--absolute``
off) and CMD from the curve ranked by |score| when both were run; for scores that are all
positive (ours) the two curves are one.
"""

from __future__ import annotations

from collections.abc import Sequence

CURVE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)  # as MIB's code writes them
SUBMISSION_PERCENTS = (0, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)  # its README: one circuit of at most each


def n_at_most(fraction: float, n_edges: int) -> int:
    """The edges of a circuit of at most ``fraction`` of ``n_edges``: MIB's ``int(pct * n)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    return int(fraction * n_edges)


def _check_curve(xs: Sequence[float], fs: Sequence[float]) -> None:
    if len(xs) != len(fs) or len(xs) < 2:
        raise ValueError(f"faithfulness: expected one value per fraction ({len(xs)}, at least 2), got {len(fs)}")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"fractions: expected increasing fractions, got {list(xs)}")


def area_under(fs: Sequence[float], xs: Sequence[float] = CURVE_FRACTIONS) -> float:
    """CPR: the trapezoidal area under faithfulness against the fraction of edges."""
    _check_curve(xs, fs)
    return sum((x2 - x1) * (f1 + f2) / 2 for x1, x2, f1, f2 in zip(xs, xs[1:], fs, fs[1:]))


def area_from_1(fs: Sequence[float], xs: Sequence[float] = CURVE_FRACTIONS) -> float:
    """CMD: the trapezoidal area between the faithfulness curve and 1."""
    _check_curve(xs, fs)
    return sum((x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2 for x1, x2, f1, f2 in zip(xs, xs[1:], fs, fs[1:]))
