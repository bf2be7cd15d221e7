"""Pictures: a circuit drawn as a graph (graphviz, matplotlib fallback) and KL against sparsity.

The circuit picture has one box per model component that the circuit's edges touch
(components without edges are left out): ``embeds`` (or ``tok_embeds``/``pos_embeds``)
at the top, then per layer its heads ``a{l}.h{h}`` on one row and its MLP ``m{l}`` below,
and ``resid_post`` (what the unembedding reads: the logits) at the bottom. An edge into a
head's query, key or value input is drawn into the head with a colour and line style per
input (q: blue solid, k: green dashed, v: red dotted), so the picture reads in grey scale
too; edges into MLPs and resid_post are grey. Under grouped-query attention a KV head's k/v
readers (``a{l}.g{g}.k/.v``) are drawn into a box ``a{l}.g{g}`` of their own, since they
feed every query head of the group.

Rendering: graphviz's ``dot`` (the ``graphviz`` Python package calls the binary; install
it with ``apt-get install graphviz`` or ``conda install graphviz``); without the binary the
picture is drawn with matplotlib in the same layered layout and a note says so. The format
follows the output's suffix: .svg, .png or .pdf.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .graph import EMBEDS, POS_EMBEDS, RESID_POST, TOK_EMBEDS, Edge

FORMATS = ("svg", "png", "pdf")
EDGE_STYLE = {  # kind -> (colour, graphviz style, matplotlib linestyle)
    "q": ("#1f77b4", "solid", "-"),
    "k": ("#2ca02c", "dashed", "--"),
    "v": ("#d62728", "dotted", ":"),
    "other": ("#555555", "solid", "-"),
}
NODE_FILL = {"embeds": "#fde9c9", "head": "#dbe9f6", "kv": "#e6f2df", "mlp": "#f3dbe8", "resid_post": "#e5e5e5"}
_QKV = re.compile(r"(a\d+\.[hg]\d+)\.([qkv])")


def _component(reader: str) -> tuple[str, str]:
    """(the box an edge into ``reader`` ends at, the edge kind q/k/v/other)."""
    m = _QKV.fullmatch(reader)
    return (m[1], m[2]) if m else (reader, "other")


def _rank(node: str) -> tuple[int, int]:
    """(row, position in the row): embeds row 0; layer l's heads (and KV groups) row 2l+1, its MLP
    row 2l+2; resid_post last. The position orders heads, and puts KV groups after them."""
    if node in (EMBEDS, TOK_EMBEDS, POS_EMBEDS):
        return 0, (EMBEDS, TOK_EMBEDS, POS_EMBEDS).index(node)
    if m := re.fullmatch(r"a(\d+)\.([hg])(\d+)", node):
        return 2 * int(m[1]) + 1, int(m[3]) + (10_000 if m[2] == "g" else 0)
    if m := re.fullmatch(r"m(\d+)", node):
        return 2 * int(m[1]) + 2, 0
    if node == RESID_POST:
        return 1 << 20, 0
    raise ValueError(f"edges: {node!r} is not a node name of an edge-pruned graph (embeds, a0.h1, m0, resid_post, ...)")


def _kind(node: str) -> str:
    if node in (EMBEDS, TOK_EMBEDS, POS_EMBEDS):
        return "embeds"
    if re.fullmatch(r"a\d+\.g\d+", node):
        return "kv"
    if node.startswith("a"):
        return "head"
    return "resid_post" if node == RESID_POST else "mlp"


def circuit_layout(edges: Iterable[Edge | Sequence[str]]) -> tuple[list[list[str]], list[tuple[str, str, str]]]:
    """(rows of boxes, top to bottom; drawn edges (source box, target box, kind)) of a circuit."""
    drawn = []
    for e in edges:
        e = Edge.parse(e)
        target, kind = _component(e.reader)
        drawn.append((e.writer, target, kind))
    nodes = {n for s, t, _ in drawn for n in (s, t)}
    rows: dict[int, list[str]] = {}
    for n in sorted(nodes, key=_rank):
        rows.setdefault(_rank(n)[0], []).append(n)
    return [rows[r] for r in sorted(rows)], drawn


def _suffix(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"out: expected a file name ending in {', '.join('.' + f for f in FORMATS)}, got {str(path)!r}")
    return fmt


def draw_circuit(edges: Iterable[Edge | Sequence[str]], path: str | Path, *, title: str | None = None,
                 engine: str = "auto") -> str:
    """Draw the circuit to ``path`` (.svg/.png/.pdf). engine: "graphviz", "matplotlib" or "auto"
    (graphviz if its ``dot`` binary runs, else matplotlib with a note on stderr). Returns the
    engine used."""
    path = Path(path)
    fmt = _suffix(path)
    if engine not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"engine: expected 'auto', 'graphviz' or 'matplotlib', got {engine!r}")
    rows, drawn = circuit_layout(edges)
    if engine in ("auto", "graphviz"):
        import graphviz

        try:
            path.write_bytes(_graphviz(rows, drawn, title).pipe(format=fmt))
            return "graphviz"
        except graphviz.ExecutableNotFound:
            if engine == "graphviz":
                raise ValueError("engine: graphviz's `dot` binary was not found; install graphviz "
                                 "(apt-get install graphviz) or use engine='matplotlib'") from None
            print("note: graphviz's `dot` binary is not installed; drawing the circuit with matplotlib instead "
                  "(apt-get install graphviz for the graphviz layout)", file=sys.stderr)
    _matplotlib(rows, drawn, title, path, fmt, fallback=engine == "auto")
    return "matplotlib"


def _legend_label(title: str | None, drawn) -> str:
    legend = "edges into a head's input: q blue solid, k green dashed, v red dotted; other edges grey"
    return f"{title}\n{legend}" if title else f"{len(drawn)} edges. {legend}"


def _graphviz(rows: list[list[str]], drawn, title: str | None):
    import graphviz

    g = graphviz.Digraph("circuit", graph_attr={"rankdir": "TB", "bgcolor": "white", "nodesep": "0.25",
                                                 "ranksep": "0.5", "labelloc": "t", "fontname": "Helvetica",
                                                 "label": _legend_label(title, drawn), "fontsize": "12"},
                         node_attr={"shape": "box", "style": "filled,rounded", "fontname": "Helvetica",
                                    "fontsize": "11", "color": "#444444"},
                         edge_attr={"arrowsize": "0.6", "penwidth": "1.2"})
    for row in rows:
        with g.subgraph() as s:
            s.attr(rank="same")
            for n in row:
                label = f"{n}\\n(logits)" if n == RESID_POST else (f"{n}\\n(k/v)" if _kind(n) == "kv" else n)
                s.node(n, label=label, fillcolor=NODE_FILL[_kind(n)])
    for src, dst, kind in drawn:
        colour, style, _ = EDGE_STYLE[kind]
        g.edge(src, dst, color=colour, style=style)
    return g


def _matplotlib(rows: list[list[str]], drawn, title: str | None, path: Path, fmt: str, fallback: bool) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    width = max(len(r) for r in rows)
    pos = {n: (x - (len(row) - 1) / 2, -y) for y, row in enumerate(rows) for x, n in enumerate(row)}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * width + 1), max(3.0, 0.9 * len(rows) + 1)))
    for i, (src, dst, kind) in enumerate(drawn):
        colour, _, ls = EDGE_STYLE[kind]
        skip = round(pos[src][1] - pos[dst][1]) - 1  # rows jumped over: bend around the boxes between
        rad = (0.0 if skip <= 0 else (0.3 + 0.1 * skip) * (1 if i % 2 else -1)) + {"k": 0.12, "v": -0.12}.get(kind, 0)
        ax.annotate("", xy=pos[dst], xytext=pos[src],
                    arrowprops={"arrowstyle": "-|>", "color": colour, "linestyle": ls, "lw": 1.1, "shrinkA": 11,
                                "shrinkB": 11, "connectionstyle": f"arc3,rad={rad:.2f}"})
    for n, (x, y) in pos.items():
        ax.text(x, y, "logits" if n == RESID_POST else n, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.3", "fc": NODE_FILL[_kind(n)], "ec": "#444444"})
    ax.set_xlim(-max(width, 3) / 2 - 0.5, max(width, 3) / 2 + 0.5)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    note = " (matplotlib layout: graphviz's dot is not installed)" if fallback else ""
    ax.set_title(textwrap.fill(_legend_label(title, drawn) + note, 70), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=150)
    plt.close(fig)


def plot_sweep(rows: Sequence[Mapping[str, float]], path: str | Path, *, title: str | None = None) -> Path:
    """KL (and, when the rows have it, the task metric and faithfulness) against edge sparsity,
    one point per swept target; ``rows``: dicts with "sparsity", "kl" and optionally
    "metric_circuit", "metric_full", "metric_empty", "faithfulness". PNG/SVG/PDF by suffix."""
    path = Path(path)
    fmt = _suffix(path)
    if not rows:
        raise ValueError("rows: expected at least one sweep result, got none")
    for i, r in enumerate(rows):
        if "sparsity" not in r or "kl" not in r:
            raise ValueError(f"rows[{i}]: expected keys 'sparsity' and 'kl', got {sorted(r)}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["sparsity"])
    x = [r["sparsity"] for r in rows]
    has_metric = all("metric_circuit" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(10 if has_metric else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    kl = [r["kl"] for r in rows]
    ax.plot(x, kl, "o-", color="#1f77b4")
    if all(v > 0 for v in kl) and max(kl) / min(kl) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("edge sparsity of the circuit")
    ax.set_ylabel("KL(full || circuit)")
    ax.set_title("KL against sparsity")
    ax.grid(alpha=0.3)
    if has_metric:
        ax = axes[0][1]
        ax.plot(x, [r["metric_circuit"] for r in rows], "o-", color="#d62728", label="circuit")
        if all("metric_full" in r for r in rows):
            ax.axhline(rows[0]["metric_full"], color="#555555", ls="--", label="full model")
        if all("metric_empty" in r for r in rows):
            ax.axhline(rows[0]["metric_empty"], color="#999999", ls=":", label="empty circuit")
        ax.set_xlabel("edge sparsity of the circuit")
        ax.set_ylabel(str(rows[0].get("metric_name", "task metric")))
        ax.set_title("task metric against sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=120)
    plt.close(fig)
    return path
