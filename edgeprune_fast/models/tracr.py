"""Tracr-compiled transformers as a torch model, and their adapter (a non-HF family).

The export format (``../tracr.py`` reads the files; the shipped suite, ``reverse`` and the
programs of tools/compile_tracr.py, is in ``data/tracr/``): ``<name>.config.json``
(architecture, input encoding, output decoding, every array's shape), parsed into
:class:`TracrConfig`, and float32 arrays named as below (per layer ``l``)::

    embed.W_tok [d_vocab, D]   embed.W_pos [n_ctx, D]            unembed.W_U [D, d_out]
    blocks.l.attn.W_Q/W_K [H, D, d_head]   b_Q/b_K [H, d_head]
    blocks.l.attn.W_V [H, D, d_head_value] b_V [H, d_head_value]
    blocks.l.attn.W_O [H, d_head_value, D] b_O [D]
    blocks.l.mlp.W_in [D, d_mlp] b_in [d_mlp]  W_out [d_mlp, D] b_out [D]

Forward (the export README; no LayerNorm, no causal mask, biases applied after the input)::

    x = W_tok[ids] + W_pos[0..T-1]                                   [B, T, D]
    per layer: q,k,v_h = x W_{Q,K,V}[h] + b_{Q,K,V}[h]
               x += sum_h softmax(q_h k_h^T / sqrt(d_head)) v_h W_O[h] + b_O   (softmax over keys)
               x += relu(x W_in + b_in) W_out + b_out
    out = x W_U                                                      [B, T, d_out]

Graph (ARCHITECTURE.md §1): writers ``embeds`` (or ``tok_embeds``/``pos_embeds``),
``a{l}.h{h}`` (z_h W_O[h] + b_O / H) and ``m{l}``; readers ``a{l}.h{h}.q/.k/.v``, ``m{l}``,
``resid_post``. ``TracrTransformer.forward_with_circuit`` recomputes every reader's input
as the sum of its kept writers (removed edges give 0, or a given ablation value): the
reference the edge-pruning machinery is tested against. ``FAMILY`` makes
``EdgePrunedModel.from_hf(load_tracr(...), ablation="zero")`` work directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..graph import EMBEDS, POS_EMBEDS, RESID_POST, TOK_EMBEDS
from .base import Adapter, Family, LayerSpec

Token = int | str
Edge = tuple[str, str]


def config_key(d: Mapping[str, Any], dotted: str, source: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise ValueError(f"{source}: missing key {dotted!r}")
        cur = cur[part]
    return cur


def _pos_int(d: Mapping[str, Any], dotted: str, source: str) -> int:
    v = config_key(d, dotted, source)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{source}: config key {dotted!r} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class TracrConfig:
    """What the loader needs from ``<name>.config.json``; ``raw`` keeps the whole file."""

    name: str
    n_heads: tuple[int, ...]  # per layer; n_layers = len(n_heads)
    d_model: int
    d_head: int
    d_head_value: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    d_out: int
    token_to_id: dict[Token, int]
    bos_token: Token
    bos_id: int
    output_kind: str  # "categorical" (argmax -> id_to_token) or "numerical" (the value of dim 0)
    id_to_token: dict[int, Token]
    raw: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return len(self.n_heads)

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.d_head)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> TracrConfig:
        a = "architecture."
        n_layers = _pos_int(d, a + "n_layers", source)
        arch = config_key(d, "architecture", source)
        heads = arch.get("n_heads_per_layer", [_pos_int(d, a + "n_heads", source)] * n_layers)
        if len(heads) != n_layers or not all(isinstance(h, int) and h > 0 for h in heads):
            raise ValueError(f"{source}: 'architecture.n_heads_per_layer' must be {n_layers} positive ints, got {heads!r}")
        dims = {k: _pos_int(d, a + k, source) for k in ("d_model", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_out")}
        dims["d_head_value"] = _pos_int(d, a + "d_head_value", source) if "d_head_value" in arch else dims["d_head"]
        for flag, want in (("layernorm", False), ("final_layernorm", False), ("mlp_activation", "relu")):
            if flag in arch and arch[flag] != want:
                raise ValueError(f"{source}: 'architecture.{flag}' = {arch[flag]!r} is not supported (expected {want!r})")
        scale = arch.get("attention", {}).get("scale")
        if scale is not None and not math.isclose(scale, 1 / math.sqrt(dims["d_head"]), rel_tol=1e-9):
            raise ValueError(f"{source}: 'architecture.attention.scale' = {scale} but the format's scale is 1/sqrt(d_head)")
        if d.get("compile_settings", {}).get("causal", False):
            raise ValueError(f"{source}: 'compile_settings.causal' is true; this loader implements bidirectional attention")
        token_to_id = {tok: i for tok, i in config_key(d, "input_encoding.token_to_id", source)}
        bos_token, bos_id = config_key(d, "input_encoding.bos_token", source), config_key(d, "input_encoding.bos_id", source)
        if token_to_id.get(bos_token) != bos_id or any(not 0 <= i < dims["d_vocab"] for i in token_to_id.values()):
            raise ValueError(f"{source}: 'input_encoding.token_to_id' {token_to_id} must map ids in [0, d_vocab) "
                             f"with {bos_token!r} -> bos_id {bos_id}")
        kind = config_key(d, "output_decoding.kind", source)
        id_to_token: dict[int, Token] = {}
        if kind == "categorical":
            id_to_token = {int(i): tok for i, tok in config_key(d, "output_decoding.id_to_token", source)}
            if sorted(id_to_token) != list(range(dims["d_out"])):
                raise ValueError(f"{source}: 'output_decoding.id_to_token' must cover ids 0..{dims['d_out'] - 1}, "
                                 f"got {sorted(id_to_token)}")
        elif kind == "numerical":
            if dims["d_out"] != 1:
                raise ValueError(f"{source}: numerical output needs 'architecture.d_out' = 1, got {dims['d_out']}")
        else:
            raise ValueError(f"{source}: 'output_decoding.kind' must be 'categorical' or 'numerical', got {kind!r}")
        cfg = cls(name=str(d.get("name", "tracr")), n_heads=tuple(heads), **dims, token_to_id=token_to_id,
                  bos_token=bos_token, bos_id=bos_id, output_kind=kind, id_to_token=id_to_token, raw=dict(d))
        declared, shapes = config_key(d, "arrays", source), cfg.expected_shapes()
        for arr, shape in shapes.items():
            got = declared[arr].get("shape") if isinstance(declared.get(arr), Mapping) else None
            if got is None:
                raise ValueError(f"{source}: missing key 'arrays.{arr}.shape' (expected {list(shape)})")
            if tuple(got) != shape:
                raise ValueError(f"{source}: 'arrays.{arr}.shape' is {list(got)} but the architecture implies {list(shape)}")
        if extra := sorted(set(declared) - set(shapes)):
            raise ValueError(f"{source}: 'arrays' lists arrays the architecture does not have: {extra}")
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every array's shape as implied by the architecture keys."""
        D, dh, dv = self.d_model, self.d_head, self.d_head_value
        s = {"embed.W_tok": (self.d_vocab, D), "embed.W_pos": (self.n_ctx, D)}
        for i, H in enumerate(self.n_heads):
            p = f"blocks.{i}."
            s |= {p + "attn.W_Q": (H, D, dh), p + "attn.b_Q": (H, dh), p + "attn.W_K": (H, D, dh),
                  p + "attn.b_K": (H, dh), p + "attn.W_V": (H, D, dv), p + "attn.b_V": (H, dv),
                  p + "attn.W_O": (H, dv, D), p + "attn.b_O": (D,), p + "mlp.W_in": (D, self.d_mlp),
                  p + "mlp.b_in": (self.d_mlp,), p + "mlp.W_out": (self.d_mlp, D), p + "mlp.b_out": (D,)}
        return s | {"unembed.W_U": (D, self.d_out)}


class _Frozen(nn.Module):
    """Export arrays under ``prefix`` as parameters with requires_grad False; state_dict
    keys are the array names."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
        super().__init__()
        for key, shape in shapes.items():
            if key.startswith(prefix) and "." not in key[len(prefix) :]:
                self.register_parameter(key[len(prefix) :], nn.Parameter(torch.zeros(shape), requires_grad=False))


class TracrEmbed(_Frozen):
    W_tok: nn.Parameter  # [d_vocab, D]
    W_pos: nn.Parameter  # [n_ctx, D]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.W_tok[input_ids] + self.W_pos[: input_ids.shape[1]]


class TracrAttention(_Frozen):
    """Bidirectional multi-head attention; head h's weights are ``W_Q[h]``, ``b_Q[h]``, ... ``W_O[h]``."""

    W_Q: nn.Parameter  # [H, D, d_head]; b_Q [H, d_head]; same for W_K, b_K
    W_V: nn.Parameter  # [H, D, d_head_value]; b_V [H, d_head_value]
    W_O: nn.Parameter  # [H, d_head_value, D]; b_O [D]

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], prefix: str, scale: float) -> None:
        super().__init__(shapes, prefix)
        self.n_heads, self.scale = self.W_Q.shape[0], scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        q = torch.einsum("btd,hde->bhte", x, self.W_Q) + self.b_Q[:, None]
        k = torch.einsum("btd,hde->bhte", x, self.W_K) + self.b_K[:, None]
        v = torch.einsum("btd,hde->bhte", x, self.W_V) + self.b_V[:, None]
        z = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) @ v  # [B, H, T, dv]
        return torch.einsum("bhte,hed->btd", z, self.W_O) + self.b_O


class TracrMLP(_Frozen):
    W_in: nn.Parameter  # [D, d_mlp]; b_in [d_mlp]
    W_out: nn.Parameter  # [d_mlp, D]; b_out [D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class TracrBlock(nn.Module):
    def __init__(self, cfg: TracrConfig, layer: int) -> None:
        super().__init__()
        shapes = cfg.expected_shapes()
        self.attn = TracrAttention(shapes, f"blocks.{layer}.attn.", cfg.attn_scale)
        self.mlp = TracrMLP(shapes, f"blocks.{layer}.mlp.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class TracrUnembed(_Frozen):
    W_U: nn.Parameter  # [D, d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_U


class TracrTransformer(nn.Module):
    """The compiled model; ``state_dict()`` keys are exactly the export's array names."""

    def __init__(self, cfg: TracrConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = TracrEmbed(cfg.expected_shapes(), "embed.")
        self.blocks = nn.ModuleList(TracrBlock(cfg, i) for i in range(cfg.n_layers))
        self.unembed = TracrUnembed(cfg.expected_shapes(), "unembed.")

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            got = f"{input_ids.dtype} shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValueError(f"input_ids: expected an integer tensor [batch, seq], got {got}")
        in_vocab = input_ids.numel() == 0 or (0 <= int(input_ids.min()) and int(input_ids.max()) < self.config.d_vocab)
        if input_ids.shape[1] > self.config.n_ctx or not in_vocab:
            raise ValueError(f"input_ids: expected seq <= n_ctx={self.config.n_ctx} and ids in [0, {self.config.d_vocab}), "
                             f"got shape {tuple(input_ids.shape)}, ids {sorted(set(input_ids.flatten().tolist()))}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (BOS at position 0) -> out [B, T, d_out]."""
        self._check_ids(input_ids)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    # ---- input / output -------------------------------------------------------------
    def encode(self, tokens: Sequence[Token] | Sequence[Sequence[Token]]) -> torch.Tensor:
        """One sequence or a batch of equal-length sequences -> input_ids [B, T]; BOS is
        prepended unless a sequence already starts with it."""
        seqs = [tokens] if not tokens or isinstance(tokens[0], (int, str)) else list(tokens)
        cfg, rows = self.config, []
        for seq in seqs:
            seq = list(seq) if seq and seq[0] == cfg.bos_token else [cfg.bos_token, *seq]
            if bad := [t for t in seq if t not in cfg.token_to_id]:
                raise ValueError(f"tokens: {bad!r} not in the vocabulary {list(cfg.token_to_id)}")
            rows.append([cfg.token_to_id[t] for t in seq])
        if len({len(r) for r in rows}) > 1 or len(rows[0]) > cfg.n_ctx:
            raise ValueError(f"tokens: expected equal lengths <= n_ctx={cfg.n_ctx} incl. BOS (padding is not masked), "
                             f"got lengths {[len(r) for r in rows]}")
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, outputs: torch.Tensor) -> list[list[Token | float]]:
        """out [B, T, d_out] -> tokens per position (categorical: id_to_token[argmax];
        numerical: the float value). Position 0 becomes the BOS token, as tracr does."""
        if outputs.dim() != 3 or outputs.shape[-1] != self.config.d_out:
            raise ValueError(f"outputs: expected [batch, seq, d_out={self.config.d_out}], got {tuple(outputs.shape)}")
        if self.config.output_kind == "categorical":
            vals: list[list[Any]] = [[self.config.id_to_token[i] for i in r] for r in outputs.argmax(-1).tolist()]
        else:
            vals = outputs[..., 0].tolist()
        return [[self.config.bos_token, *r[1:]] for r in vals]

    # ---- graph and the per-edge reference --------------------------------------------
    def writers(self, split_embeds: bool = False) -> list[str]:
        """Writer nodes in residual order: embeds, a0.h*, m0, a1.h*, m1, ..."""
        out = [TOK_EMBEDS, POS_EMBEDS] if split_embeds else [EMBEDS]
        for i, H in enumerate(self.config.n_heads):
            out += [f"a{i}.h{h}" for h in range(H)] + [f"m{i}"]
        return out

    def readers(self) -> list[str]:
        out = []
        for i, H in enumerate(self.config.n_heads):
            out += [f"a{i}.h{h}.{c}" for h in range(H) for c in "qkv"] + [f"m{i}"]
        return out + [RESID_POST]

    def upstream(self, reader: str, split_embeds: bool = False) -> list[str]:
        """Writers that feed ``reader``: earlier layers' writers; an MLP also reads its own layer's heads."""
        ws = self.writers(split_embeds)
        if reader == RESID_POST:
            return ws
        if reader.startswith("m"):
            return ws[: ws.index(reader)]
        return ws[: ws.index(reader.split(".")[0] + ".h0")]

    def full_graph_edges(self, split_embeds: bool = False) -> list[Edge]:
        return [(w, r) for r in self.readers() for w in self.upstream(r, split_embeds)]

    def run_with_writers(self, input_ids: torch.Tensor, split_embeds: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full model through the reference path: (out [B, T, d_out], {writer: [B, T, D]})."""
        return self.forward_with_circuit(input_ids, self.full_graph_edges(split_embeds), split_embeds=split_embeds,
                                         return_writers=True)

    def forward_with_circuit(self, input_ids: torch.Tensor, kept_edges: Iterable[Sequence[str]], *,
                             split_embeds: bool = False, ablated: Mapping[str, torch.Tensor] | None = None,
                             return_writers: bool = False) -> Any:
        """Slow reference: each reader's input is ``sum_w (y_w if (w, r) kept else y~_w)``,
        with y~_w = 0 (zero ablation) or ``ablated[w]`` (e.g. the corrupted run's writers
        from ``run_with_writers``). Returns out [B, T, d_out] (and the writer outputs)."""
        self._check_ids(input_ids)
        full = set(self.full_graph_edges(split_embeds))
        kept = {tuple(e) for e in kept_edges}
        if bad := sorted(e for e in kept if e not in full):
            raise ValueError(f"kept_edges: {len(bad)} edges not in the {'split-embeds ' if split_embeds else ''}graph, "
                             f"e.g. {bad[:3]}")
        if ablated is not None and (missing := [w for w in self.writers(split_embeds) if w not in ablated]):
            raise ValueError(f"ablated: expected an output for every writer, missing {missing}")
        T, y = input_ids.shape[1], {}
        pos = self.embed.W_pos[:T].expand(*input_ids.shape, -1)
        if split_embeds:
            y[TOK_EMBEDS], y[POS_EMBEDS] = self.embed.W_tok[input_ids], pos
        else:
            y[EMBEDS] = self.embed.W_tok[input_ids] + pos

        def read(reader: str) -> torch.Tensor:
            x = torch.zeros_like(y[next(iter(y))])
            for w in self.upstream(reader, split_embeds):
                if (w, reader) in kept:
                    x = x + y[w]
                elif ablated is not None:
                    x = x + ablated[w]
            return x

        for i, block in enumerate(self.blocks):
            at = block.attn
            for h in range(at.n_heads):
                q = read(f"a{i}.h{h}.q") @ at.W_Q[h] + at.b_Q[h]
                k = read(f"a{i}.h{h}.k") @ at.W_K[h] + at.b_K[h]
                v = read(f"a{i}.h{h}.v") @ at.W_V[h] + at.b_V[h]
                z = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
                y[f"a{i}.h{h}"] = z @ at.W_O[h] + at.b_O / at.n_heads
            y[f"m{i}"] = block.mlp(read(f"m{i}"))
        out = self.unembed(read(RESID_POST))
        return (out, y) if return_writers else out


def tracr_adapter(model: TracrTransformer) -> Adapter:
    """The edge-pruning adapter of a ``TracrTransformer`` (``FAMILY``):
    no norms (identity), bidirectional attention (causal=False), no rotary, the export's own
    W_Q/W_K/W_V/W_O arrays as the per-head views, and ``run_with_writers`` as the reference
    forward (full outputs and every writer's state). Attention masks are ignored: tracr
    sequences are never padded (``encode`` rejects unequal lengths)."""
    cfg = model.config
    layers = tuple(LayerSpec(attn_norm=nn.Identity(), mlp_norm=nn.Identity(), W_Q=b.attn.W_Q, b_Q=b.attn.b_Q,
                             W_K=b.attn.W_K, b_K=b.attn.b_K, W_V=b.attn.W_V, b_V=b.attn.b_V, W_O=b.attn.W_O,
                             b_O=b.attn.b_O, mlp=b.mlp, scale=cfg.attn_scale, o_proj=None) for b in model.blocks)

    def reference(ids, attention_mask, position_ids, graph):  # -> (out [B, T, d_out], writers [W, B, T, D])
        out, y = model.run_with_writers(ids, graph.config.split_embeds)
        return out, torch.stack([y[w] for w in graph.writer_names()])

    return Adapter(architecture="TracrTransformer", model=model, layers=layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx,
                   embed_tokens=lambda ids: model.embed.W_tok[ids], embed_positions=lambda pos: model.embed.W_pos[pos],
                   rotary=None, apply_rotary=None, final_norm=nn.Identity(), unembed=model.unembed,
                   full_forward=lambda ids, mask, pos: model(ids), causal=False, reference_fn=reference)


FAMILY = Family(classes=("TracrTransformer",), adapter=tracr_adapter)
