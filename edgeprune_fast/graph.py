"""The computational graph of an edge-pruned transformer: nodes, edges and their order.

Naming (ARCHITECTURE.md §1). Writers, in residual order (a writer's *slot* is its index):

    embeds                      token (+ absolute position) embedding; with split_embeds:
    tok_embeds, pos_embeds      the two separately (only models with absolute positions)
    a{l}.h{h}                   head h of layer l: z_h W_O[h] + b_O / n_heads
    m{l}                        the MLP of layer l

Readers, per layer l, then the final one:

    a{l}.h{h}.q                 head h's query input (one per query head)
    a{l}.h{h}.k, a{l}.h{h}.v    key / value input, one per KV head; with grouped-query
    a{l}.g{g}.k, a{l}.g{g}.v    attention (n_kv_heads < n_heads) the KV head g is shared by
                                query heads g*n_heads/n_kv_heads ... (g+1)*n_heads/n_kv_heads-1
                                and the readers are named by group g
                                (``kv_per_query_head``: one k and one v reader per *query*
                                head instead, named a{l}.h{h}.k/.v, as MIB's graph has them
                                (TransformerLens' ungroup_grouped_query_attention); head h's key
                                and value are its own reader's input times its group's W_K/W_V)
    m{l}                        the MLP's input (same name as its writer; an edge is (writer, reader))
    resid_post                  what the final norm and the unembedding read

Edges: writer w feeds reader r iff w comes earlier in the order ``embeds, a0.h*, m0,
a1.h*, m1, ...`` than r, except that the heads of a layer do not feed that layer's q/k/v,
and with a parallel attention+MLP block (GPT-NeoX ``use_parallel_residual``) they do not
feed that layer's MLP either. So every reader reads a *prefix* of the writer order, whose
length is the reader's ``n_upstream``; the readers of one layer's attention share a
prefix and form one :class:`ReaderGroup` (one mask tensor [n_readers, n_upstream]).

Graph order of edges (used by mask tensors, scores and ``edges()``): groups in order
``a0, m0, a1, m1, ..., resid_post``; inside the attention group the readers are all q
readers (by head), then all k readers, then all v readers (by KV head, or by query head with
kv_per_query_head); for each reader its
upstream writers in residual order (row-major over the group's mask tensor).

Text form of an edge: ``"a0.h3->a2.h1.q"``; JSON form ``["a0.h3", "a2.h1.q"]``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

EMBEDS, TOK_EMBEDS, POS_EMBEDS, RESID_POST = "embeds", "tok_embeds", "pos_embeds", "resid_post"


@dataclass(frozen=True)
class Node:
    """A writer or a reader. kind: embeds | tok_embeds | pos_embeds | head | mlp (writers);
    q | k | v | mlp | resid_post (readers). layer/index are None where meaningless (index is
    the head for heads and q readers, the KV head for k/v readers, or the query head with
    kv_per_query_head)."""

    name: str
    role: str  # "writer" | "reader"
    kind: str
    layer: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Edge:
    writer: str
    reader: str

    def __str__(self) -> str:
        return f"{self.writer}->{self.reader}"

    def as_pair(self) -> list[str]:
        return [self.writer, self.reader]

    @classmethod
    def parse(cls, edge: str | Sequence[str] | Edge) -> Edge:
        """From ``"w->r"``, ``[w, r]``/``(w, r)`` or an Edge; ValueError on anything else."""
        if isinstance(edge, Edge):
            return edge
        if isinstance(edge, str):
            parts = edge.split("->")
            if len(parts) == 2 and all(p.strip() for p in parts):
                return cls(parts[0].strip(), parts[1].strip())
        elif isinstance(edge, Sequence) and len(edge) == 2 and all(isinstance(p, str) for p in edge):
            return cls(edge[0], edge[1])
        raise ValueError(f"edge: expected 'writer->reader' or a [writer, reader] pair, got {edge!r}")


@dataclass(frozen=True)
class ReaderGroup:
    """Readers that read the same writer prefix and share one mask tensor [len(readers), n_upstream].

    key: ``a{l}`` (the attention readers of layer l), ``m{l}`` or ``resid_post``.
    offset: index of the group's first edge in graph order."""

    key: str
    readers: tuple[str, ...]
    n_upstream: int
    offset: int
    layer: int | None = None

    @property
    def n_edges(self) -> int:
        return len(self.readers) * self.n_upstream


def _per_layer(name: str, value: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    vals = (value,) * n_layers if isinstance(value, int) else tuple(value)
    if len(vals) != n_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"{name}: expected a positive int or {n_layers} positive ints (one per layer), got {value!r}")
    return vals


@dataclass(frozen=True)
class GraphConfig:
    """What fixes the graph. n_heads / n_kv_heads: an int or one int per layer.
    kv_per_query_head: k/v readers per query head under grouped-query attention (see the
    module docstring); normalised to False when no layer groups its heads (the graphs are
    the same then)."""

    n_layers: int
    n_heads: int | tuple[int, ...]
    n_kv_heads: int | tuple[int, ...] | None = None  # None: = n_heads
    split_embeds: bool = False
    parallel_mlp: bool = False
    kv_per_query_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"GraphConfig.n_layers: expected a positive int, got {self.n_layers!r}")
        heads = _per_layer("GraphConfig.n_heads", self.n_heads, self.n_layers)
        kv = heads if self.n_kv_heads is None else _per_layer("GraphConfig.n_kv_heads", self.n_kv_heads, self.n_layers)
        for layer, (h, k) in enumerate(zip(heads, kv)):
            if h % k:
                raise ValueError(f"GraphConfig.n_kv_heads: layer {layer} has {h} heads, not a multiple of {k} KV heads")
        object.__setattr__(self, "n_heads", heads)
        object.__setattr__(self, "n_kv_heads", kv)
        object.__setattr__(self, "kv_per_query_head", bool(self.kv_per_query_head) and heads != kv)

    def kv_readers(self, layer: int) -> int:
        """The number of k (and of v) readers of a layer: its KV heads, or its query heads."""
        return self.n_heads[layer] if self.kv_per_query_head else self.n_kv_heads[layer]

    def to_json(self) -> str:
        d = {"n_layers": self.n_layers, "n_heads": list(self.n_heads), "n_kv_heads": list(self.n_kv_heads),
             "split_embeds": self.split_embeds, "parallel_mlp": self.parallel_mlp}
        if self.kv_per_query_head:  # only when set: the signatures of earlier graphs stay as they were
            d["kv_per_query_head"] = True
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> GraphConfig:
        """The config of a ``to_json`` dict; ValueError naming what is missing."""
        try:
            return cls(int(d["n_layers"]), tuple(d["n_heads"]), tuple(d["n_kv_heads"]), bool(d.get("split_embeds", False)),
                       bool(d.get("parallel_mlp", False)), bool(d.get("kv_per_query_head", False)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"graph: expected a GraphConfig dict (n_layers, n_heads, n_kv_heads, split_embeds, "
                             f"parallel_mlp, kv_per_query_head), got {dict(d)!r:.200} ({exc})") from None


def n_edges_closed_form(n_layers: int, n_heads: int, n_kv_heads: int | None = None, *,
                        split_embeds: bool = False, parallel_mlp: bool = False, kv_per_query_head: bool = False) -> int:
    """Number of edges with H heads and K KV heads in every layer, in closed form.

    With E embedding writers, layer l's readers see W_l = E + l(H+1) writers; its H + 2K
    attention readers and its MLP read W_l (the MLP also the layer's H heads unless the block
    is parallel), resid_post reads all E + L(H+1)::

        (H + 2K + 1) * (L E + (H+1) L(L-1)/2) + [not parallel] L H + E + L(H+1)

    (K = H with ``kv_per_query_head``: MIB's count, e.g. 179,749 for Qwen2.5-0.5B.)
    """
    L, H = n_layers, n_heads
    K = H if n_kv_heads is None or kv_per_query_head else n_kv_heads
    E = 2 if split_embeds else 1
    return (H + 2 * K + 1) * (L * E + (H + 1) * L * (L - 1) // 2) + (0 if parallel_mlp else L * H) + E + L * (H + 1)


@dataclass(frozen=True)
class Graph:
    """Writers, readers, reader groups and edges of one model (see the module docstring)."""

    config: GraphConfig
    writers: tuple[Node, ...] = field(init=False)
    readers: tuple[Node, ...] = field(init=False)
    groups: tuple[ReaderGroup, ...] = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        writers = [Node(TOK_EMBEDS, "writer", TOK_EMBEDS), Node(POS_EMBEDS, "writer", POS_EMBEDS)] if c.split_embeds \
            else [Node(EMBEDS, "writer", EMBEDS)]
        readers: list[Node] = []
        groups: list[ReaderGroup] = []
        offset = 0

        def add_group(key: str, rs: list[Node], n_up: int, layer: int | None) -> None:
            nonlocal offset
            readers.extend(rs)
            groups.append(ReaderGroup(key, tuple(r.name for r in rs), n_up, offset, layer))
            offset += len(rs) * n_up

        for layer, H in enumerate(c.n_heads):
            n_before = len(writers)
            K = c.kv_readers(layer)
            kv = "h" if K == H else "g"
            attn = [Node(f"a{layer}.h{h}.q", "reader", "q", layer, h) for h in range(H)]
            attn += [Node(f"a{layer}.{kv}{g}.{t}", "reader", t, layer, g) for t in "kv" for g in range(K)]
            add_group(f"a{layer}", attn, n_before, layer)
            writers += [Node(f"a{layer}.h{h}", "writer", "head", layer, h) for h in range(H)]
            add_group(f"m{layer}", [Node(f"m{layer}", "reader", "mlp", layer)],
                      n_before if c.parallel_mlp else len(writers), layer)
            writers.append(Node(f"m{layer}", "writer", "mlp", layer))
        add_group(RESID_POST, [Node(RESID_POST, "reader", RESID_POST)], len(writers), None)
        object.__setattr__(self, "writers", tuple(writers))
        object.__setattr__(self, "readers", tuple(readers))
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "_slot", {w.name: i for i, w in enumerate(writers)})
        object.__setattr__(self, "_reader_pos", {r: (gi, ri) for gi, g in enumerate(groups)
                                                 for ri, r in enumerate(g.readers)})

    @classmethod
    def build(cls, n_layers: int, n_heads: int | Sequence[int], n_kv_heads: int | Sequence[int] | None = None, *,
              split_embeds: bool = False, parallel_mlp: bool = False, kv_per_query_head: bool = False) -> Graph:
        def to_t(v):
            return v if v is None or isinstance(v, int) else tuple(v)

        return cls(GraphConfig(n_layers, to_t(n_heads), to_t(n_kv_heads), split_embeds, parallel_mlp,
                               kv_per_query_head))

    # -- sizes and lookups -----------------------------------------------------------------
    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_edges(self) -> int:
        return sum(g.n_edges for g in self.groups)

    def nodes(self) -> list[Node]:
        """Writers (residual order), then readers (graph order)."""
        return [*self.writers, *self.readers]

    def writer_names(self) -> list[str]:
        return [w.name for w in self.writers]

    def reader_names(self) -> list[str]:
        return [r.name for r in self.readers]

    def slot(self, writer: str) -> int:
        """The writer's slot (index in residual order)."""
        if writer not in self._slot:
            raise ValueError(f"writer: {writer!r} is not a writer of this graph{_suggest(writer, self._slot)}")
        return self._slot[writer]

    def group_of(self, reader: str) -> tuple[int, int]:
        """(group index, row in the group's mask tensor) of a reader."""
        if reader not in self._reader_pos:
            raise ValueError(f"reader: {reader!r} is not a reader of this graph{_suggest(reader, self._reader_pos)}")
        return self._reader_pos[reader]

    def edges(self) -> list[Edge]:
        """Every edge, in graph order."""
        names = self.writer_names()
        return [Edge(names[w], r) for g in self.groups for r in g.readers for w in range(g.n_upstream)]

    def edge_index(self, edge: str | Sequence[str] | Edge) -> tuple[int, int, int]:
        """(group index, row, column) of an edge in the mask tensors; ValueError naming an
        unknown edge, with close names suggested."""
        e = Edge.parse(edge)
        if e.writer not in self._slot or e.reader not in self._reader_pos:
            known = [str(x) for x in self._near_edges(e)]
            hint = f"; did you mean {', '.join(repr(k) for k in known)}?" if known else ""
            what = "writer" if e.writer not in self._slot else "reader"
            raise ValueError(f"edges: {str(e)!r} does not exist: unknown {what} "
                             f"{e.writer if what == 'writer' else e.reader!r}{hint}")
        gi, row = self._reader_pos[e.reader]
        col = self._slot[e.writer]
        if col >= self.groups[gi].n_upstream:
            known = [str(x) for x in self._near_edges(e)]
            hint = f"; close edges that exist: {', '.join(map(repr, known))}" if known else ""
            ws = self.writer_names()
            raise ValueError(f"edges: {str(e)!r} does not exist: {e.writer!r} is not upstream of {e.reader!r}, which "
                             f"reads the writers {ws[0]!r} .. {ws[self.groups[gi].n_upstream - 1]!r} (a reader reads only "
                             f"writers of earlier layers; an MLP also its own layer's heads unless the block is "
                             f"parallel){hint}")
        return gi, row, col

    def _near_edges(self, e: Edge, n: int = 3) -> list[Edge]:
        readers = [e.reader] if e.reader in self._reader_pos else \
            difflib.get_close_matches(e.reader, list(self._reader_pos), n=n, cutoff=0.5)
        m = re.fullmatch(r"a(\d+)\.h(\d+)\.([kv])", e.reader)
        if m and int(m[1]) < self.config.n_layers and not self.config.kv_per_query_head:  # per-head k/v in a grouped graph
            layer, head = int(m[1]), int(m[2])
            grouped = f"a{layer}.g{head // (self.config.n_heads[layer] // self.config.n_kv_heads[layer])}.{m[3]}"
            if grouped in self._reader_pos:
                readers = [grouped]
        out: list[Edge] = []
        for r in readers:
            g = self.groups[self._reader_pos[r][0]]
            ws = self.writer_names()[: g.n_upstream]
            out += [Edge(w, r) for w in difflib.get_close_matches(e.writer, ws, n=n, cutoff=0.3)]
        return out[:n]

    def signature(self) -> str:
        """A JSON string that identifies the graph (stored with saved masks)."""
        return self.config.to_json()


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
