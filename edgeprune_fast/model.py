"""EdgePrunedModel: an HF causal LM whose every reader reads a masked mix of its upstream writers.

Wraps an already loaded model and reuses its modules and weights (frozen); see graph.py
for names, models/ for the supported architectures (one module per family), writers.py for the slot buffer and
the reference capture, masks.py for the mask parameters. One forward (ARCHITECTURE.md §2):

    slots[0:E]   = embedding writers                                     [E, B, S, D]
    per layer l:
      x_a        = edge_mix(log_alpha[a{l}], slots[:W_l], corrupt[:W_l])   [H + 2K, B, S, D]
      q_h        = attn_norm(x_a[h]) @ W_Q[h] + b_Q[h]          (k, v likewise, per KV head;
                   with kv_per_query_head x_a is [3H, B, S, D] and head h's k and v come from its
                   own readers times its group's W_K/W_V: one bmm of [K, (H/K)*B*S, D] by [K, D, dh])
                   then q_norm / k_norm where the model has them (per head, or OLMo-2's
                   over all heads' projection of each reader's input)
      q, k       = the model's rotary (cos/sin from its rotary module, its apply_rotary_pos_emb)
      z          = scaled_dot_product_attention(q, k, v, causal (+ sliding window) + padding
                   mask, scale); with an attention softcap (Gemma-2) the same written out
      slots[a{l}.h*] = z_h @ W_O[h] + b_O / H                              [H, B, S, D]
                   (with a post-attention norm: each head's share of RMSNorm(o), writers.py;
                   under post_norm="reader" the pre-norm z_h W_O[h], each reader then norming
                   its own mix of every upstream layer's heads: post_norm.py)
      x_m        = edge_mix(log_alpha[m{l}], slots[:W_m], corrupt[:W_m])   (W_m = W_l if parallel)
      slots[m{l}] = mlp(mlp_norm(x_m))                  (post-MLP norm applied where there is one)
    logits       = unembed(final_norm(edge_mix(log_alpha[resid_post], slots, corrupt)))
                   (c * tanh(logits / c) with Gemma-2's final softcap c)

``corrupt`` is the corrupted run's writer states (a constant), None under zero ablation,
or the mean writer outputs under mean ablation. (As computed, the slots hold each writer's
output minus its corrupted state and a read is the zero-ablation mix of the slots plus the
corrupted prefix sum: the same x, one stream per read instead of two; writers.py.) With
every mask exactly 1 the logits equal
the HF model's (the sum of writers is its residual stream); with every mask 0 under
corrupted ablation they equal the HF model's on the corrupted input.

Masks: training draws hard-concrete samples (node masks drawn once per forward and shared
by all readers); eval uses the deterministic masks; ``set_circuit`` fixes exact 0/1 masks.
Position ids default to ``arange(S)`` for every row, as the HF forward of every supported
model does when given only an attention_mask (transformers 5: GPT2Model, LlamaModel,
GPTNeoXModel, Qwen2Model and the others build ``arange`` and ignore padding); the mask is
HF's SDPA mask: causal AND key-not-padding (AND the sliding window on windowed layers; None,
with is_causal, when nothing is padded or windowed).
Query positions that are themselves padding give meaningless (but finite) logits, as in HF.

Large models (``checkpoint_layers``, ``corrupted_on_cpu``): with per-layer activation
checkpointing (torch.utils.checkpoint, non-reentrant) a layer keeps nothing for backward
but the slot buffer; its reads (the writer mixing), attention and MLP are recomputed in
backward. The hard-concrete noise of a layer is drawn *before* its checkpointed region and
passed in, so the recomputation uses the same masks without replaying the RNG. Recomputing
rewrites the layer's own slots with the same values (WriterStore.resume), which is harmless:
later readers have finished their backward by then. With ``corrupted_on_cpu`` the corrupted
writer states stay in host memory (pinned under CUDA) and are copied to the device a slot
at a time, for its write and for the running prefix sum (again when a checkpointed layer
is recomputed); none of the copies is kept for backward. Across processes (``shard_weights``, sharding.py) FSDP2 keeps 1/P of every weight
per process; ``_run`` gathers each decoder layer, and the root (embeddings, final norm,
unembedding), around its own work, and backward gathers it again (identity hooks on the
token that threads the layer), with or without checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .graph import Edge, Graph, GraphConfig
from .masks import EdgeMasks
from .models import Adapter, adapter_for
from .ops import edge_mix, hard_concrete, mix
from .ops.hard_concrete import draw_seed
from .ops.params import HardConcreteParams
from .post_norm import check_post_norm, normed_layers, post_norm_mix
from .sharding import fsdp_wrapped
from .writers import WriterStore, capture_writer_states, embedding_writers, head_writers, rms_norm

ABLATIONS = ("corrupted", "zero", "mean")


@dataclass
class EdgePrunedOutput:
    """logits [B, S, V]; edge_sparsity / node_sparsity: 1 - expected kept fraction (0-dim,
    differentiable in log_alpha; the Lagrangian's s); sampled_*: the same counted on the masks
    used in this forward (z > 0), detached."""

    logits: torch.Tensor
    edge_sparsity: torch.Tensor
    node_sparsity: torch.Tensor
    sampled_edge_sparsity: torch.Tensor
    sampled_node_sparsity: torch.Tensor


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r:.60}"


class EdgePrunedModel(nn.Module):
    """Edge-pruned view of an HF causal LM (GPT-2, Llama, GPT-NeoX/Pythia, Qwen2/3, Mistral, Gemma,
    Gemma-2, Phi-3, OLMo-2; models/).

    Build with :meth:`from_hf` or :meth:`from_pretrained`; call like a module:
    ``out = pruned(input_ids, corrupted_input_ids, attention_mask)`` -> EdgePrunedOutput.
    """

    store_cls = WriterStore  # the slot buffer (tests swap in a plain concatenating one)

    def __init__(self, model: nn.Module, *, split_embeds: bool = False, node_masks: bool = True,
                 ablation: str = "corrupted", mean_writers: torch.Tensor | None = None, init: float = 10.0,
                 init_std: float = 0.01, params: HardConcreteParams | None = None, checkpoint_layers: bool = False,
                 corrupted_on_cpu: bool = False, kv_per_query_head: bool = False, post_norm: str = "writer") -> None:
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation: expected one of {', '.join(map(repr, ABLATIONS))}, got {ablation!r}")
        if fsdp_wrapped(model):  # the adapter's views would be of the shards
            raise ValueError("model: expected an HF model not wrapped by fully_shard (wrap it unsharded, then call "
                             "shard_weights()), got one with FSDP-sharded modules")
        # Frozen before the adapter takes its per-head weight views: views taken while the weights
        # required grad would carry a grad_fn, and every backward would compute weight gradients
        model.requires_grad_(False)
        adapter = adapter_for(model)  # NotImplementedError for unsupported models
        if split_embeds and adapter.embed_positions is None:
            raise ValueError(f"split_embeds: {adapter.architecture} has no absolute position embedding (positions "
                             f"enter through rotary), so it has one 'embeds' writer; expected split_embeds=False, got True")
        if kv_per_query_head and any(s.qk_norm_over_heads and s.n_kv_heads != s.n_heads for s in adapter.layers):
            raise NotImplementedError(f"kv_per_query_head: {adapter.architecture}'s k norm spans all KV heads, which "
                                      f"per-query-head k readers of grouped heads cannot reproduce; expected "
                                      f"kv_per_query_head=False for this model")
        self.post_norm = check_post_norm(post_norm, adapter)
        model.eval()
        self.hf = model
        self.adapter: Adapter = adapter
        self.ablation = ablation
        heads = tuple(s.n_heads for s in adapter.layers)
        kv = tuple(s.n_kv_heads for s in adapter.layers)
        self._graph = Graph(GraphConfig(adapter.n_layers, heads, kv, split_embeds, adapter.parallel_mlp,
                                        kv_per_query_head))
        self.masks = EdgeMasks(self._graph, node_masks=node_masks, init=init, init_std=init_std, params=params,
                               device=adapter.device)
        # reader mode: the post-normed layers' head slots, normed per reader (post_norm.py)
        self._normed = () if self.post_norm == "writer" else \
            normed_layers(adapter, lambda i: self._graph.slot(f"a{i}.h0"))
        self.checkpoint_layers = bool(checkpoint_layers)
        self.corrupted_on_cpu = bool(corrupted_on_cpu)
        self.sharding = None  # sharding.ShardedWeights once shard_weights() is called; None: weights replicated
        self.probe = None  # attribution.py's probe inside probing(): its masks, its store, its writes
        self.mean_writers: torch.Tensor | None = None
        if mean_writers is not None:
            self.set_mean_writers(mean_writers)
        elif ablation == "mean":
            raise ValueError("mean_writers: expected a tensor [W, D] or [W, S, D] of mean writer outputs under "
                             "ablation='mean' (see compute_mean_writers), got None")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: nn.Module, *, split_embeds: bool = False, node_masks: bool = True,
                ablation: str = "corrupted", mean_writers: torch.Tensor | None = None, init: float = 10.0,
                init_std: float = 0.01, params: HardConcreteParams | None = None, checkpoint_layers: bool = False,
                corrupted_on_cpu: bool = False, kv_per_query_head: bool = False,
                post_norm: str = "writer") -> EdgePrunedModel:
        """Wrap a loaded HF causal LM (its modules and weights are reused and frozen; it is put
        in eval mode). ``init``/``init_std``: log_alpha ~ N(init, init_std). ``checkpoint_layers``:
        recompute each layer in backward (see the module docstring); ``corrupted_on_cpu``: keep
        the corrupted writer states in host memory, streamed to the device per read.
        ``kv_per_query_head``: under grouped-query attention, one k and one v reader per query
        head (MIB's graph, graph.py) instead of one per KV head. ``post_norm`` (models whose
        attention output is normed before the residual: Gemma-2, OLMo-2): "writer" (default),
        head h writes its share g * o_h / rms(o) of the normed output; "reader" (MIB / EAP-IG's
        graph), head h writes z_h W_O[h] and each reader norms its own mix of the layer's heads
        (post_norm.py says what a circuit means in each)."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a loaded HF causal LM (nn.Module), got {_describe(model)}")
        return cls(model, split_embeds=split_embeds, node_masks=node_masks, ablation=ablation,
                   mean_writers=mean_writers, init=init, init_std=init_std, params=params,
                   checkpoint_layers=checkpoint_layers, corrupted_on_cpu=corrupted_on_cpu,
                   kv_per_query_head=kv_per_query_head, post_norm=post_norm)

    def gradient_checkpointing(self, enable: bool = True) -> EdgePrunedModel:
        """Turn per-layer activation checkpointing on or off (see the module docstring)."""
        self.checkpoint_layers = bool(enable)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> EdgePrunedModel:
        """Load a local directory written by ``save_pretrained`` (AutoModelForCausalLM, no hub
        access) and wrap it; ``kwargs`` go to :meth:`from_hf`."""
        p = Path(path).expanduser()
        if not p.is_dir() or not (p / "config.json").is_file():
            what = "does not exist" if not p.exists() else ("is not a directory" if not p.is_dir() else
                                                            "has no config.json")
            raise ValueError(f"path: expected a local directory written by save_pretrained (models are not "
                             f"downloaded from the hub), got {str(path)!r}, which {what}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        if device is not None:
            model = model.to(device)
        return cls.from_hf(model, **kwargs)

    def shard_weights(self, mesh=None) -> EdgePrunedModel:
        """Shard the frozen HF weights over the processes with FSDP2 (``fully_shard`` per decoder
        layer and on the root; see sharding.py); the masks stay whole on every process. Needs
        an initialised process group (``DataParallel.from_env()``); move or cast the model
        first. ``mesh``: a 1-D DeviceMesh (default: every process)."""
        from .sharding import shard_weights

        if self._normed:
            raise ValueError("post_norm: 'reader' reads every upstream layer's post-norm weights in each layer, which "
                             "sharded weights do not hold; expected post_norm='writer' with shard_weights")
        self.sharding, self.adapter = shard_weights(self.adapter, mesh)
        return self

    def _gathered_root(self):
        """The root's weights (embeddings, final norm, unembedding) gathered for the body when sharded."""
        return nullcontext() if self.sharding is None else self.sharding.gathered(self.sharding.root)

    def _apply(self, fn, recurse=True):
        """Module.to/cuda/half reach the HF model; masks follow the device only (they stay float32);
        the adapter's weight views are rebuilt on the converted parameters."""
        if self.sharding is not None:
            raise ValueError("model: its weights are sharded (shard_weights); expected .to()/.half()/... before "
                             "sharding, got a call after it")
        self.hf._apply(fn, recurse)
        device = fn(torch.zeros(1)).device
        self.masks._apply(lambda t: t.to(device), recurse)
        if self.masks.circuit is not None:
            self.masks.circuit = [z.to(device) for z in self.masks.circuit]
        if self.mean_writers is not None:
            self.mean_writers = self.mean_writers.to(device)
        self.adapter = adapter_for(self.hf)
        return self

    def train(self, mode: bool = True) -> EdgePrunedModel:
        """Sets whether masks are sampled (training) or deterministic; the HF modules stay in eval
        mode (no dropout)."""
        self.training = mode
        self.masks.train(mode)
        self.hf.eval()
        return self

    # -- graph and masks -------------------------------------------------------------------------
    @property
    def graph(self) -> Graph:
        return self._graph

    def edge_log_alpha_parameters(self) -> list[nn.Parameter]:
        return list(self.masks.edge_log_alpha)

    def node_log_alpha_parameters(self) -> list[nn.Parameter]:
        return [] if self.masks.node_log_alpha is None else [self.masks.node_log_alpha]

    def set_circuit(self, edges: Iterable[str | Sequence[str] | Edge]) -> None:
        """Fix every mask exactly: 1 on ``edges`` (text ``"w->r"`` or ``[w, r]`` pairs), 0 elsewhere;
        node masks are ignored while a circuit is set. ValueError naming an unknown edge."""
        self.masks.set_circuit(edges)

    def clear_circuit(self) -> None:
        """Back to the learned masks."""
        self.masks.clear_circuit()

    def mask_state_dict(self) -> dict[str, torch.Tensor]:
        """{"edges.<group>": log_alpha [R, W_g], ..., "nodes": [W]} (detached, float32)."""
        return {k: v.detach() for k, v in self.masks.state().items()}

    def load_mask_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks.load_state(state)

    def save_masks(self, path: str | Path) -> None:
        """Write the log_alphas to a safetensors file (with the graph's signature)."""
        self.masks.save(path)

    def load_masks(self, path: str | Path) -> None:
        self.masks.load(path)

    def edge_scores(self) -> torch.Tensor:
        """A deterministic score per edge, in ``graph.edges()`` order: its log_alpha (see EdgeMasks)."""
        return self.masks.edge_scores()

    def node_scores(self) -> torch.Tensor | None:
        return self.masks.node_scores()

    def effective_scores(self) -> torch.Tensor:
        """Per edge in graph order: min(edge, writer node) log_alpha, the ranking circuits are cut from."""
        return self.masks.effective_scores()

    def edge_writer_index(self) -> torch.Tensor:
        """Writer slot of every edge in graph order (to combine edge and node scores)."""
        return self.masks.writer_index()

    def sparsity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge, node) sparsity: expected (differentiable), or the fixed circuit's."""
        return self.masks.circuit_sparsity() if self.masks.circuit is not None else self.masks.expected_sparsity()

    # -- inputs ----------------------------------------------------------------------------------
    def _check_ids(self, name: str, ids, like: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"{name}: expected an integer tensor [batch, seq], got {_describe(ids)}")
        if like is not None and ids.shape != like.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(like.shape)}, got {tuple(ids.shape)}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one sequence of one token, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.adapter.n_ctx:
            raise ValueError(f"{name}: sequence length {ids.shape[1]} is longer than the model's context of "
                             f"{self.adapter.n_ctx} positions ({self.adapter.architecture})")
        vocab = getattr(self.adapter.embed_tokens, "num_embeddings", None)
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{name}: expected token ids in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
        return ids.to(self.adapter.device).long()

    def _check_attention_mask(self, name: str, mask, shape: torch.Size) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name}: expected a 0/1 tensor of the input's shape {tuple(shape)}, got {_describe(mask)}")
        mask = mask.to(self.adapter.device)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}: expected only 0 and 1 (1 = real token), got other values")
        return mask

    def _positions(self, position_ids, B: int, S: int) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(S, device=self.adapter.device)[None]  # what the HF forward uses
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape not in ((1, S), (B, S)):
            raise ValueError(f"position_ids: expected an integer tensor [1 or {B}, {S}], got {_describe(position_ids)}")
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= self.adapter.n_ctx:
            raise ValueError(f"position_ids: expected values in [0, {self.adapter.n_ctx}), got "
                             f"{int(position_ids.min())}..{int(position_ids.max())}")
        return position_ids.to(self.adapter.device).long()

    def _sdpa_mask(self, mask: torch.Tensor | None, S: int,
                   window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask [B or 1, 1, S, S] bool or None, is_causal), as HF builds it for SDPA;
        ``window``: a sliding window (key j seen by query i iff i - window < j <= i)."""
        causal = self.adapter.causal
        padded = mask is not None and not bool(mask.all())
        banded = window is not None and window < S
        if not padded and not banded:
            return None, causal
        ones = torch.ones(S, S, dtype=torch.bool, device=self.adapter.device)
        keep = ones.tril() if causal else ones
        if banded:
            keep = keep & ~ones.tril(-window)
        keep = keep[None, None]
        if padded:
            keep = keep & mask.bool()[:, None, None, :]
        return keep, False

    # -- reference (unmodified model) ---------------------------------------------------------------
    @torch.no_grad()
    def reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  position_ids: torch.Tensor | None = None, states: bool = True,
                  logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits [B, S, V], writer states [W, B, S, D] in ``graph.writers`` order) from one
        plain no-grad forward of the unmodified model with each head's output captured. Pass
        the states of the corrupted input as ``corrupted_writers`` to reuse them across steps.
        ``states=False``: the logits only (states None), a plain forward with no capture, for
        the clean input whose states a step does not use. ``logits=False``: the states only
        (logits None), the forward stopping before the unembedding, for the corrupted input."""
        if not (states or logits):
            raise ValueError("states, logits: expected at least one of them True, got both False")
        ids = self._check_ids("input_ids", input_ids)
        mask = self._check_attention_mask("attention_mask", attention_mask, ids.shape)
        pos = self._positions(position_ids, *ids.shape)
        with self._gathered_root():  # sharded: FSDP's own hooks gather each layer in the HF forward
            if not states and self.adapter.reference_fn is None:
                return self.adapter.full_forward(ids, mask, pos), None
            out, writer_states = capture_writer_states(self.adapter, self._graph, ids, mask, pos, logits=logits,
                                                       post_norm=self.post_norm)
        return out, writer_states if states else None

    @torch.no_grad()
    def compute_mean_writers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                             per_position: bool = False) -> torch.Tensor:
        """Mean writer outputs over the batch and the real (unpadded) positions: [W, D], or
        per position [W, S, D]; pass to ``set_mean_writers`` for mean ablation."""
        _, states = self.reference(input_ids, attention_mask, logits=False)
        w = torch.ones(input_ids.shape, device=states.device) if attention_mask is None else \
            attention_mask.to(states.device).float()
        sw = (states.float() * w[None, :, :, None])
        if per_position:
            return (sw.sum(1) / w.sum(0).clamp_min(1)[None, :, None]).to(states.dtype)
        return (sw.sum((1, 2)) / w.sum().clamp_min(1)).to(states.dtype)

    @torch.no_grad()
    def use_mean_ablation(self, batches: Iterable) -> EdgePrunedModel:
        """Switch to mean ablation with the mean writer outputs over the real tokens of
        ``batches`` (anything with input_ids and attention_mask, e.g. a task's training
        batches), each batch weighted by its tokens; returns the model. Call it before
        sharding the weights: every process then holds the same means."""
        total, count = None, 0.0
        for b in batches:
            n = float(b.input_ids.numel() if b.attention_mask is None else b.attention_mask.sum())
            mean = self.compute_mean_writers(b.input_ids, b.attention_mask).float() * n
            total, count = (mean if total is None else total + mean), count + n
        if total is None:
            raise ValueError("batches: expected at least one batch to take the mean writer outputs over, got none")
        self.set_mean_writers(total / count)
        self.ablation = "mean"
        return self

    def set_mean_writers(self, mean_writers: torch.Tensor) -> None:
        """Mean-ablation values: [W, D] (one vector per writer) or [W, S_max, D] (per position)."""
        W, D = self._graph.n_writers, self.adapter.d_model
        if not isinstance(mean_writers, torch.Tensor) or mean_writers.dim() not in (2, 3) or \
                mean_writers.shape[0] != W or mean_writers.shape[-1] != D:
            raise ValueError(f"mean_writers: expected a tensor [{W}, {D}] or [{W}, S, {D}] (W writers, d_model), "
                             f"got {_describe(mean_writers)}")
        self.mean_writers = mean_writers.detach().to(self.adapter.device, self.adapter.dtype)

    def _ablation_states(self, ids, corrupted_input_ids, corrupted_writers, corrupted_attention_mask, pos):
        B, S = ids.shape
        W, D = self._graph.n_writers, self.adapter.d_model
        if self.ablation == "zero":
            return None
        if self.ablation == "mean":
            m = self.mean_writers
            if m.dim() == 3 and m.shape[1] < S:
                raise ValueError(f"mean_writers: per-position means cover {m.shape[1]} positions, the input has {S}")
            m = m[:, None, None, :] if m.dim() == 2 else m[:, None, :S, :]
            return m.expand(W, B, S, D).contiguous()
        if corrupted_writers is not None:
            if not isinstance(corrupted_writers, torch.Tensor) or tuple(corrupted_writers.shape) != (W, B, S, D):
                raise ValueError(f"corrupted_writers: expected the corrupted run's writer states [{W}, {B}, {S}, {D}] "
                                 f"(from reference(corrupted_input_ids)[1]), got {_describe(corrupted_writers)}")
            return self.place_corrupted_writers(corrupted_writers.detach())
        if corrupted_input_ids is None:
            raise ValueError("corrupted_input_ids: required under ablation='corrupted' (or pass corrupted_writers, "
                             "e.g. reference(corrupted_input_ids)[1]), got None")
        cids = self._check_ids("corrupted_input_ids", corrupted_input_ids, like=ids)
        cmask = self._check_attention_mask("corrupted_attention_mask", corrupted_attention_mask, ids.shape)
        with self._gathered_root():
            states = capture_writer_states(self.adapter, self._graph, cids, cmask, pos, logits=False,
                                           post_norm=self.post_norm)[1]
            return self.place_corrupted_writers(states)

    def place_corrupted_writers(self, states: torch.Tensor) -> torch.Tensor:
        """Corrupted states [W, B, S, D] where the forward keeps them: in the model dtype, on the
        device, or (corrupted_on_cpu) in host memory, pinned under CUDA so that the per-read
        copies can overlap compute. Call it once on cached states (the Trainer does), so that
        no device copy is cached and each forward finds them in place."""
        a = self.adapter
        if not self.corrupted_on_cpu:
            return states.to(a.device, a.dtype)
        states = states.to("cpu", a.dtype)
        return states.pin_memory() if a.device.type == "cuda" and not states.is_pinned() else states

    @contextmanager
    def probing(self, probe) -> Iterator[None]:
        """Inside: the masks are ``probe.circuit`` (one [R, n] tensor per reader group, all 1 and
        requiring grad: a fixed circuit whose mix backward gives d metric / dz), forwards use
        ``probe.store(...)`` for their slots (called as the store class) and each write goes
        through ``probe.write(slot, y) -> y or its replacement`` (attribution.py). Stay inside
        through backward: checkpointed layers are recomputed there. On exit the learned
        masks, any fixed circuit and the ablation mode are as they were."""
        if self._normed:  # the probe's store feeds the readers' sums; reader mode norms the heads apart
            raise NotImplementedError("probing (attribution): expected post_norm='writer', got 'reader'; "
                                      "attribute with the default post-norm mode")
        saved, self.masks.circuit, self.probe = self.masks.circuit, probe.circuit, probe
        try:
            yield
        finally:
            self.masks.circuit, self.probe = saved, None

    def probed_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inside :meth:`probing`: logits [B, S, V] of the forward with the probe's masks, store
        and writes (no ablation states: the probe's store holds what the readers mix)."""
        if self.probe is None:
            raise RuntimeError("probed_forward: expected to be called inside `with model.probing(probe):`")
        ids = self._check_ids("input_ids", input_ids)
        mask = self._check_attention_mask("attention_mask", attention_mask, ids.shape)
        return self._run(ids, pos=self._positions(None, *ids.shape), mask=mask, corrupt=None,
                         training=False).logits

    # -- the edge-pruned forward ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, corrupted_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, corrupted_attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, corrupted_writers: torch.Tensor | None = None,
                training: bool | None = None) -> EdgePrunedOutput:
        """input_ids [B, S]; corrupted_input_ids [B, S] (required under corrupted ablation unless
        ``corrupted_writers`` [W, B, S, D] from :meth:`reference` is given); attention_mask [B, S]
        (1 = token, 0 = padding; left or right); corrupted_attention_mask defaults to
        attention_mask; training: sample masks (default: ``self.training``)."""
        ids = self._check_ids("input_ids", input_ids)
        B, S = ids.shape
        mask = self._check_attention_mask("attention_mask", attention_mask, ids.shape)
        cmask = mask if corrupted_attention_mask is None else corrupted_attention_mask
        pos = self._positions(position_ids, B, S)
        training = self.training if training is None else bool(training)
        corrupt = self._ablation_states(ids, corrupted_input_ids, corrupted_writers, cmask, pos)
        return self._run(ids, pos, mask, corrupt, training)

    def _run(self, ids, pos, mask, corrupt, training) -> EdgePrunedOutput:
        a, g, m = self.adapter, self._graph, self.masks
        B, S = ids.shape
        attn_masks = {w: self._sdpa_mask(mask, S, w) for w in {s.sliding_window for s in a.layers}}
        make = self.store_cls if self.probe is None else self.probe.store
        store = make(g.n_writers, (B, S, a.d_model), a.dtype, a.device, torch.is_grad_enabled(), corrupt)
        if self._normed:
            store.exclude_from_sum(s for nl in self._normed for s in range(nl.first, nl.stop))
        with self._gathered_root():
            self._write(store, embedding_writers(a, ids, pos, g.config.split_embeds))
        rope = None if a.rotary is None else a.rotary(torch.empty(0, dtype=a.dtype, device=a.device), pos)
        u_node = None
        if training and m.circuit is None and m.node_log_alpha is not None:
            u_node = self._uniform(g.n_writers)
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        sh = self.sharding  # sharded: each unit gathered around its work, forward and backward (sharding.py)
        kept = []
        for layer, spec in enumerate(a.layers):
            # Noise drawn here, outside the checkpointed region, in the order the reads use it
            noise = (self._noise(2 * layer, training, u_node), self._noise(2 * layer + 1, training, u_node))
            if sh is not None:
                store.token = sh.enter(sh.layers[layer], store.token)
            args = (store.token, store, layer, spec, training, noise, rope, *attn_masks[spec.sliding_window])
            out = checkpoint(self._layer, *args, use_reentrant=False) if recompute else self._layer(*args)
            store.token = out[0] if sh is None else sh.leave(sh.layers[layer], out[0])
            kept += out[1:]
        if sh is not None:
            store.token = sh.enter(sh.root, store.token)
        args = (store.token, store, training, self._noise(len(g.groups) - 1, training, u_node))
        h_r, k_r = checkpoint(self._final, *args, use_reentrant=False) if recompute else self._final(*args)
        kept.append(k_r)
        if not recompute:  # backward never reads them: freed now unless the caller holds them
            store.release_corrupted()
        logits = a.unembed(h_r)
        if a.final_softcap is not None:  # Gemma-2, in HF's order
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        if sh is not None:
            logits = sh.leave(sh.root, logits)
        edge_sp, node_sp = self.sparsity()
        with torch.no_grad():
            s_edge = 1 - sum(kept) / g.n_edges
            if m.circuit is not None or m.node_log_alpha is None:
                s_node = torch.zeros((), device=a.device)
            else:
                z = hard_concrete(m.node_log_alpha.detach(), u=u_node, training=training, params=m.params)
                s_node = 1 - (z > 0).float().mean()
        return EdgePrunedOutput(logits, edge_sp, node_sp, torch.as_tensor(s_edge, device=a.device).float(), s_node)

    def _uniform(self, *shape: int) -> torch.Tensor:
        eps = self.masks.params.eps
        return eps + (1 - 2 * eps) * torch.rand(*shape, device=self.adapter.device)

    def _noise(self, gi: int, training: bool, u_node) -> dict:
        """The hard-concrete noise of reader group gi's masks (edge_mix keywords): explicit
        uniforms with node masks, else a seed; nothing for fixed circuits or eval."""
        m = self.masks
        if m.circuit is not None or not training:
            return {}
        if m.node_log_alpha is not None:
            n = self._graph.groups[gi].n_upstream
            return {"u_edge": self._uniform(*m.edge_log_alpha[gi].shape), "u_node": u_node[:n]}
        return {"seed": draw_seed()}

    def _layer(self, token, store: WriterStore, layer: int, spec, training, noise, rope, attn_mask, is_causal):
        """One block: its heads and MLP written to the store; returns (token, kept edges of its
        two reader groups). Re-entrant for checkpointing: it starts from the given token."""
        store.resume(token, self._graph.groups[2 * layer].n_upstream)
        x, k_a = self._read(2 * layer, store, training, noise[0])  # [H + 2K, B, S, D]
        self._write(store, self._attention(spec, x, rope, attn_mask, is_causal))
        x_m, k_m = self._read(2 * layer + 1, store, training, noise[1])
        y = spec.mlp(spec.mlp_norm(x_m[0]))
        self._write(store, (y if spec.mlp_post_norm is None else rms_norm(y, spec.mlp_post_norm))[None])
        return store.token, k_a, k_m

    def _write(self, store: WriterStore, y: torch.Tensor) -> None:
        """store.write(y), or what the probe puts in y's place (attribution's interpolated writers)."""
        store.write(y if self.probe is None else self.probe.write(store.n_written, y))

    def _final(self, token, store: WriterStore, training, noise):
        """final_norm(resid_post's input) [B, S, D] and its kept edges."""
        store.resume(token, self._graph.n_writers)
        x_r, k = self._read(len(self._graph.groups) - 1, store, training, noise)
        return self.adapter.final_norm(x_r[0]), k

    def _read(self, gi: int, store: WriterStore, training: bool, noise: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [R, B, S, D] of reader group gi: its masks applied to the writer prefix,
        number of its edges kept in this forward). The slots hold clean - corrupted, so
        x = sum_w corrupt[w] + z (clean - corrupt) is the zero-ablation mix of the slots plus
        the corrupted prefix sum (writers.py)."""
        m, n = self.masks, self._graph.groups[gi].n_upstream
        delta = store.read(n)
        sink = store.grad_into(n) if torch.is_grad_enabled() else None  # backward adds into the slots' gradient
        base = store.corrupted_sum(n)  # float32, added inside the kernel: x is rounded once
        normed = [nl for nl in self._normed if nl.stop <= n]
        if normed:
            return self._read_normed(gi, store, training, noise, normed, delta, sink, base)
        if m.circuit is not None:
            z = m.circuit[gi]
            x = mix(z, delta, base=base, grad_into=sink)
        else:
            la = m.edge_log_alpha[gi]
            kw: dict = {"training": training, "params": m.params, "base": base, "grad_into": sink, **noise}
            if m.node_log_alpha is not None:
                kw["log_alpha_node"] = m.node_log_alpha[:n]
            x, z = edge_mix(la, delta, **kw)
        return x, (z.detach() > 0).sum()

    def _read_normed(self, gi, store: WriterStore, training, noise, normed, delta, sink, base):
        """_read under post_norm="reader" for a group with post-normed heads upstream: the
        masks z drawn on their own, the linear part mixed with those heads' columns zeroed
        (``base`` leaves them out: exclude_from_sum), each such layer normed per reader on the
        mix of its heads (post_norm.py)."""
        m, n = self.masks, delta.shape[0]
        if m.circuit is not None:
            z = m.circuit[gi]
        else:
            la, p = m.edge_log_alpha[gi], m.params
            if m.node_log_alpha is not None:
                z = hard_concrete(la, u=noise.get("u_edge"), training=training, params=p) * \
                    hard_concrete(m.node_log_alpha[:n], u=noise.get("u_node"), training=training, params=p)[None]
            else:
                z = hard_concrete(la, seed=noise.get("seed"), training=training, params=p)
        linear = torch.ones(n, dtype=z.dtype, device=z.device)
        parts = []
        for nl in normed:
            linear[nl.first:nl.stop] = 0
            spec = self.adapter.layers[nl.layer]
            b = store.corrupted_range_sum(nl.first, nl.stop)
            if spec.b_O is not None:
                b = spec.b_O.to(_arith(delta.dtype)).expand(delta.shape[1:]) if b is None else b + spec.b_O
            parts.append((nl.first, nl.stop, spec.attn_post_norm, b))
        x = mix(z * linear, delta, base=base, grad_into=sink)
        grads = store.grad_buffer(n) if torch.is_grad_enabled() else None
        x = (x + post_norm_mix(z, delta, parts, grads)).to(delta.dtype)
        return x, (z.detach() > 0).sum()

    def _attention(self, spec, x: torch.Tensor, rope, attn_mask, is_causal: bool) -> torch.Tensor:
        """Head writers [H, B, S, D] from the attention readers' inputs x [H + 2K, B, S, D]
        (x [3H, B, S, D] with k/v readers per query head)."""
        H, K = spec.n_heads, spec.n_kv_heads
        per_query = self._graph.config.kv_per_query_head and K != H
        h = spec.attn_norm(x)
        n, B, S, D = h.shape

        def project(part, W, b):  # [n*r, B, S, D] @ [n, D, d] -> [B, n*r, S, d], the bias as the product's start
            part = part.reshape(W.shape[0], -1, D)  # r readers per weight (r = H/K per-query k/v, else 1): no copy
            y = torch.bmm(part, W) if b is None else torch.baddbmm(b[:, None, :], part, W)
            return y.view(-1, B, S, W.shape[-1]).transpose(0, 1)

        def project_normed(part, W, b, norm):  # OLMo-2: norm over all n heads' projection of each reader's input
            m = part.shape[0]
            y = part.reshape(m, B * S, D) @ W.transpose(1, 2).reshape(-1, D).T  # [m, BS, m*d]: m times the work
            y = norm(y if b is None else y + b.reshape(-1)).view(m, B * S, m, -1)
            return y.diagonal(dim1=0, dim2=2).permute(2, 0, 1).reshape(m, B, S, -1).transpose(0, 1)  # reader i, head i

        if spec.qk_norm_over_heads:  # (per-query k/v readers with grouped heads are refused for it in __init__)
            hq, hk, hv = h.split([H, K, K])
            q, k = project_normed(hq, spec.W_Q, spec.b_Q, spec.q_norm), project_normed(hk, spec.W_K, spec.b_K, spec.k_norm)
            v = project(hv, spec.W_V, spec.b_V)
        elif spec.W_QKV is not None and not per_query:  # one product for all H + 2K readers; h's gradient comes out whole
            q, k, v = project(h, spec.W_QKV, spec.b_QKV).split([H, K, K], dim=1)
        else:
            R = H if per_query else K
            hq, hk, hv = h.split([H, R, R])  # split, not slicing: its backward is one cat, not 3 zero-filled copies
            q, k, v = project(hq, spec.W_Q, spec.b_Q), project(hk, spec.W_K, spec.b_K), project(hv, spec.W_V, spec.b_V)
        if not spec.qk_norm_over_heads:  # Qwen3: per head, over dh
            q = q if spec.q_norm is None else spec.q_norm(q)
            k = k if spec.k_norm is None else spec.k_norm(k)
        if rope is not None:
            q, k = self.adapter.apply_rotary(q, k, *rope)
        if K != H and not per_query:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        if spec.softcap is None:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=spec.scale)
        else:
            z = softcapped_attention(q, k, v, attn_mask, is_causal, spec.scale, spec.softcap)
        if self._normed and spec.attn_post_norm is not None:  # reader mode: the pre-norm outputs (post_norm.py)
            return head_writers(z, spec.W_O, None)
        return head_writers(z, spec.W_O, spec.b_O, post_norm=spec.attn_post_norm)


def _arith(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcapped_attention(q, k, v, attn_mask: torch.Tensor | None, is_causal: bool, scale: float,
                         cap: float) -> torch.Tensor:
    """softmax(mask(cap * tanh(scale q k^T / cap))) v, q/k/v [B, H, S, d] -> z [B, H, S, dv], in
    the order of HF's eager attention (SDPA has no softcap): the scores [B, H, S, S] are
    materialised; masked keys get the dtype's lowest value (a query that sees none stays
    finite); the softmax is float32 (float64 for float64 models)."""
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap
    if attn_mask is None and is_causal:
        S = q.shape[-2]
        attn_mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    p = scores.softmax(-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return p.to(v.dtype) @ v
