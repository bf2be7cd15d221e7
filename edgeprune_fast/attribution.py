"""Edge attribution on the edge-pruned graph: EAP and EAP-IG (inputs and activations).

The score of edge w -> r is the derivative of a metric M in the edge's mask at the full
model (every mask 1, deterministic, ARCHITECTURE.md §2):

    score[r, w] = dM/dz[r, w] |_{z=1} = <delta_w, g_r>        delta_w = y_w - y~_w    [B, S, D]
                                                              g_r     = dM/dx_r       [B, S, D]

summed over batch, positions and d_model; y_w is writer w's output on the clean input, y~_w
on the corrupted one (both from plain captures of the unmodified model, writers.py), x_r the
reader's input. Methods (Hanna et al. 2024, hannamw/EAP-IG ``src/eap/attribute.py``, read at
commit 795f560; written from their definitions, not their code):

    eap                  g_r at the clean input: one backward per batch.
    eap-ig               ("EAP-IG-inputs") the embedding writers are interpolated,
                         e(a) = y~_e + a (y_e - y~_e), and g_r is averaged over
                         a = k / steps for k = 0 .. steps - 1 (their placement: a left
                         Riemann sum that includes the corrupted end and excludes the clean
                         one): one backward per step.
    eap-ig-activations   ("EAP-IG-activations") for each writer group in turn (the embeddings;
                         layer l's heads together, their one ``a{l}.h0`` hook on the attention
                         result; m{l}), that group's outputs are replaced by the constant
                         y~ + a (y - y~), a = k / steps for k = 1 .. steps (their placement:
                         excludes the corrupted end, includes the clean one), the rest of the
                         model runs on the clean input, and g_r is averaged over all
                         (2L + 1) * steps runs: one backward per step and group, as theirs.

In every method delta_w is the clean minus corrupted difference of the *captures*, never of
an interpolated run, as in EAP-IG.

Conventions (what differs from EAP-IG's files, and why):

- Sign: ours is dM/dz with M "higher = the behaviour is there" (logit difference, log-prob,
  -KL). EAP-IG computes (y~ - y) . dm/dx with m the *loss* its examples pass
  (``logit_diff(loss=True)`` = -logit difference, ``kl_div`` = +KL): the same sign as ours
  for those metrics. A positive score: the edge helps the behaviour (removing it lowers M).
  Files keep the sign; tools that rank by |score| (EAP-IG's ``apply_topn(absolute=True)``,
  MIB) see the same order either way.
- Scale: M is the mean over examples (over target positions for kl), the IG average is the
  mean over steps. EAP-IG divides a batch-mean metric by the number of examples once more
  (a positive factor 1 / batch size per batch); rankings are unchanged.
- Metrics: ``logit-diff`` logit(label) - logit(contrast) at the first target position (tasks
  with a contrasting answer: IOI, gendered pronouns, MIB's); ``log-prob`` log p(label) there
  (log-softmax over the vocabulary); ``kl`` -KL(p_full || p) at every target position, over
  the task's candidates or the vocabulary (the training loss, negated). The default follows
  EAP-IG's use per task: logit difference where the task has a contrasting answer, else
  log-prob. EAP with kl is refused: KL(p_full || p) is minimal (0) at the full model, so its
  gradient there is exactly 0 and every score would be 0.

How it runs: the fused forward itself (``EdgePrunedModel.probing`` / ``probed_forward``), with
every mask a fixed 1 that requires grad, so that the scores are the mask gradients the fused
mix backward computes for every edge in one pass (ops/edge_mix.py: dL/dz[r, w] =
<dL/dx_r, slot_w>). For that the slot buffer holds delta itself (``DeltaStore``: the
[W, B, S, D] difference of the captures is the buffer, never written) and the readers add
the running sum of y_w - delta_w over the outputs y written so far, in place of the
corrupted prefix sum: each reader's input is sum_w y_w, the plain forward's (also where the
IG variants replace writers by interpolations), and its mask gradient is <g_r, delta_w>
whatever the run's own outputs. So one backward serves every edge, no reader gradient is
kept, and the memory is no more than a training step's: delta takes the slots' place
(plus the embeddings' corrupted states for eap-ig, or every writer's for the activations
variant, and [2L + 1] prefix sums of [B, S, D]). An earlier version added a tap per reader
group whose backward multiplied g [R, B*S*D] by delta[:n].T, beside the mix backward's own
(unused) mask-gradient product: one more product per group and a second [W, B, S, D]
tensor (its figures: bench/results/attribution_cpu_v1_tap.*; bench/attribution_bench.py
measures this one, attribution_cpu.*). Per-layer checkpointing
(``checkpoint_layers``) works unchanged (backward runs inside ``probing``; a recomputed
write finds its prefix sum and is replaced by the same constant). Processes
(``data_parallel``, torchrun): every process attributes its rows of each batch (with the
weights replicated or FSDP2-sharded, as pruning) and the score and unit sums are
all-reduced once at the end.

Output: scores [E] in graph order (``Graph.edges()``), float64 for float64 models, else
float32 (the mix backward's products accumulate in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .tasks.base import TaskBatch
from .writers import Slots, WriterStore, WriteSlots

METHODS = ("eap", "eap-ig", "eap-ig-activations")
METRICS = ("logit-diff", "log-prob", "kl")


# -- metrics ---------------------------------------------------------------------------------------
def has_contrast(task) -> bool:
    """Whether the task names a contrasting answer (LogitDiffTask's ``contrast_key``)."""
    return isinstance(getattr(task, "contrast_key", None), str)


def default_metric(task) -> str:
    """EAP-IG's choice per task: logit difference where there is a contrasting answer, else log-prob."""
    return "logit-diff" if has_contrast(task) else "log-prob"


def check_method_metric(method: str, metric: str, task) -> None:
    """ValueError naming the argument for a method or metric that cannot be used (here, with this task)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if method == "eap" and metric == "kl":
        raise ValueError("metric: 'kl' with method 'eap' is meaningless: KL(p_full || p) is 0 at the full model, "
                         "its minimum, so its gradient there (every EAP score) is exactly 0; expected "
                         "--metric logit-diff or log-prob with eap, or an IG method (eap-ig, eap-ig-activations) "
                         "with kl")
    if metric == "logit-diff" and not has_contrast(task):
        raise ValueError(f"metric: 'logit-diff' needs a task with a contrasting answer (IOI, gendered pronouns, "
                         f"MIB's tasks); {getattr(task, 'name', type(task).__name__)!r} has none; expected "
                         f"--metric log-prob or kl")


def metric_sum(metric: str, task, logits: torch.Tensor, full_logits: torch.Tensor | None,
               batch: TaskBatch) -> tuple[torch.Tensor, int]:
    """(sum of the metric over the batch's units, number of units): examples, or target
    positions for kl. Computed in float32 (float64 for float64 logits)."""
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if metric == "kl":
        def log_probs(z):
            x = z[batch.target_mask].to(cd)
            return F.log_softmax(x if batch.candidates is None else x[:, batch.candidates], dim=-1)

        kl = F.kl_div(log_probs(logits), log_probs(full_logits), log_target=True, reduction="sum")
        return -kl, int(batch.target_mask.sum())
    if batch.labels is None:
        raise ValueError(f"metric: {metric!r} reads each example's label, and the task's batches have none")
    has = batch.target_mask.any(dim=1)
    if not bool(has.all()):
        raise ValueError(f"batch.target_mask: every row needs a target position, rows "
                         f"{torch.nonzero(~has).flatten().tolist()} have none")
    first = batch.target_mask.int().argmax(dim=1)  # the first target position of each row
    x = logits[torch.arange(logits.shape[0], device=logits.device), first].to(cd)  # [B, V]
    label = x.gather(1, batch.labels[:, None]).squeeze(1)
    if metric == "logit-diff":
        return (label - x.gather(1, batch.extras[task.contrast_key][:, None]).squeeze(1)).sum(), len(batch)
    return (label - torch.logsumexp(x, dim=-1)).sum(), len(batch)


# -- the probe -------------------------------------------------------------------------------------
class DeltaStore(WriterStore):
    """A slot buffer that *is* delta [W, B, S, D] (clean - corrupted, never written), with
    ``corrupted_sum(n)`` = sum_{w<n} (y_w - delta_w) over the outputs y written so far: each
    reader's input, corrupted_sum + sum_w 1 * slot_w, is then sum_w y_w, the plain forward's,
    while the mix backward's mask gradient is <dM/dx_r, delta_w>, the score. The prefix sums
    are kept at every write boundary ([2L + 1] x [B, S, D], float32; float64 for float64
    models), so a checkpointed layer's recomputation finds its own."""

    def __init__(self, delta: torch.Tensor, track_grad: bool) -> None:  # no WriterStore.__init__: no new buffer
        self.slots = Slots.__new__(Slots)
        self.slots.data, self.slots.grad = delta, None
        self.token = torch.empty(0, dtype=delta.dtype, device=delta.device, requires_grad=track_grad)
        self.n_written, self.corrupt = 0, None
        acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
        self._prefix = {0: torch.zeros(delta.shape[1:], dtype=acc, device=delta.device)}

    def corrupted_sum(self, n: int) -> torch.Tensor:
        return self._prefix[n]

    def write(self, y: torch.Tensor) -> None:
        slot, k = self.n_written, y.shape[0]
        if slot + k > self.buffer.shape[0] or y.shape[1:] != self.buffer.shape[1:]:
            raise RuntimeError(f"DeltaStore: cannot write {tuple(y.shape)} at slot {slot} of {tuple(self.buffer.shape)}")
        acc = self._prefix[0].dtype
        rest = (y.detach().to(acc) - self.buffer[slot:slot + k].to(acc)).sum(0)
        self._prefix[slot + k] = self._prefix[slot] + rest
        self.token = WriteSlots.apply(self.token, y, self.slots, slot)
        self.n_written = slot + k

    def release_corrupted(self) -> None:  # the prefix sums are small; a recomputation needs them
        pass


class Probe:
    """What ``EdgePrunedModel.probing`` uses: ``circuit`` (every mask 1, requiring grad: the
    scores accumulate in their ``.grad``), ``store`` (a DeltaStore over ``delta``) and
    ``write`` (``replace``: {first slot: constant [k, B, S, D]} put in place of the writer
    outputs at that slot: the interpolations)."""

    def __init__(self, graph, delta: torch.Tensor, dtype: torch.dtype) -> None:
        self.graph, self.delta = graph, delta
        self.circuit = [torch.ones(len(g.readers), g.n_upstream, dtype=dtype, device=delta.device,
                                   requires_grad=True) for g in graph.groups]
        self.replace: dict[int, torch.Tensor] = {}

    def store(self, n_writers, shape, dtype, device, track_grad, corrupt) -> DeltaStore:
        if tuple(self.delta.shape) != (n_writers, *shape) or self.delta.dtype != dtype:
            raise RuntimeError(f"attribution: delta is {tuple(self.delta.shape)} {self.delta.dtype}, the forward "
                               f"needs {(n_writers, *shape)} {dtype}")
        return DeltaStore(self.delta, track_grad)

    def write(self, slot: int, y: torch.Tensor) -> torch.Tensor:
        r = self.replace.get(slot)
        if r is None:
            return y
        if r.shape != y.shape:
            raise RuntimeError(f"attribution: replacement of slot {slot} has shape {tuple(r.shape)}, the write "
                               f"{tuple(y.shape)}")
        return r

    def scores(self) -> torch.Tensor:
        """The summed mask gradients of every backward so far, [E] in graph order."""
        return torch.cat([torch.zeros(z.numel(), dtype=z.dtype, device=z.device) if z.grad is None
                          else z.grad.flatten() for z in self.circuit])


# -- attribution -------------------------------------------------------------------------------------
def _writer_groups(graph) -> list[tuple[int, int]]:
    """(first slot, count) of EAP-IG's nodes for the activations variant: the embeddings, each
    layer's heads, each MLP (in residual order)."""
    ws = graph.writer_names()
    E = sum(1 for w in ws if "embeds" in w)
    out, slot = [(0, E)], E
    for H in graph.config.n_heads:
        out += [(slot, H), (slot + H, 1)]
        slot += H + 1
    return out


def runs_per_batch(method: str, graph, ig_steps: int) -> int:
    """Forward + backward passes per batch."""
    if method == "eap":
        return 1
    if method == "eap-ig":
        return ig_steps
    return len(_writer_groups(graph)) * ig_steps


def attribute(model, task, batches: Sequence[TaskBatch], *, method: str = "eap-ig", metric: str | None = None,
              ig_steps: int = 5, progress: bool = True, on_step: Callable[[], None] | None = None,
              data_parallel=None) -> torch.Tensor:
    """Scores [E] of every edge of ``model.graph`` (an EdgePrunedModel), graph order; see the
    module docstring. ``task``: for the metric (its contrast key); ``batches``: its batches
    with corrupted inputs; ``metric``: None for ``default_metric(task)``. ``data_parallel``:
    a distributed.DataParallel: each process attributes its rows of every batch and the
    sums are all-reduced (the same scores on every process, those of one process)."""
    metric = default_metric(task) if metric is None else metric
    check_method_metric(method, metric, task)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps: expected an integer >= 1, got {ig_steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    dp = data_parallel
    for i, b in enumerate(batches):
        if b.corrupted_input_ids is None:
            raise ValueError(f"batches: batch {i} has no corrupted inputs; attribution patches from the corrupted run")
        if dp is not None and len(b) < dp.world_size:
            raise ValueError(f"batch_size: every batch is split over the {dp.world_size} processes; expected at least "
                             f"one row per process, got a batch of {len(b)} (batch {i}); choose a batch size whose "
                             f"last batch has at least {dp.world_size} rows")
    from tqdm.auto import tqdm

    graph, a = model.graph, model.adapter
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    total = torch.zeros(graph.n_edges, dtype=acc)
    units = 0
    steps = runs_per_batch(method, graph, ig_steps)
    groups = _writer_groups(graph)
    bar = tqdm(total=steps * len(batches), desc=f"attribute ({method})", disable=not progress, unit="pass")
    try:
        for batch in batches:
            batch = (batch if dp is None else dp.shard(batch)).to(a.device)
            # the full model's logits only where the metric reads them (kl)
            full_logits, delta = model.reference(batch.input_ids, batch.attention_mask, logits=metric == "kl")
            _, corrupt = model.reference(batch.corrupted_input_ids, batch.attention_mask, logits=False)
            delta.sub_(corrupt)  # clean - corrupted, in place: the slot buffer of every run of this batch
            E = groups[0][1]
            if method == "eap":
                corrupt, plans = None, [None]
            elif method == "eap-ig":  # the embeddings' corrupted states only
                corrupt, plans = corrupt[:E].clone(), [(0, E, k) for k in range(ig_steps)]
            else:
                plans = [(first, n, k) for first, n in groups for k in range(1, ig_steps + 1)]
            probe = Probe(graph, delta, acc)
            n_units = 0
            for plan in plans:
                if plan is not None:  # writers first .. first + n - 1 at a = k / steps
                    first, n, k = plan
                    probe.replace = {first: corrupt[first:first + n] + (k / ig_steps) * delta[first:first + n]}
                with torch.enable_grad(), model.probing(probe):
                    logits = model.probed_forward(batch.input_ids, batch.attention_mask)
                    value, n_units = metric_sum(metric, task, logits, full_logits, batch)
                    if value.requires_grad:
                        value.backward()
                    del logits, value
                probe.replace = {}
                bar.update(1)
                if on_step is not None:
                    on_step()
            total += probe.scores().cpu().to(acc) / len(plans)
            units += n_units
            del probe, delta, corrupt
    finally:
        bar.close()
    if dp is not None:  # sums over every process's rows: one all_reduce
        import torch.distributed as dist

        both = torch.cat([total.double(), torch.tensor([float(units)], dtype=torch.float64)]).to(dp.device)
        dist.all_reduce(both)
        total, units = both[:-1].cpu().to(acc), int(round(float(both[-1])))
    return total / max(units, 1)
