"""What a task is: data plus a metric (the trainer is task-agnostic).

A task yields :class:`TaskBatch` es of aligned clean/corrupted prompts and says where the
model's prediction is read (``target_mask``) and which tokens compete (``candidates``):

    input_ids, corrupted_input_ids   [B, S] int64 (same shape: clean and corrupted prompts
                                     must tokenise to the same length; never cropped)
    attention_mask                   [B, S] 0/1 or None (1 = real token)
    target_mask                      [B, S] bool: positions whose output distribution the
                                     loss and the metric read (the logits at position t
                                     predict token t+1)
    candidates                       [C] int64 token ids the KL runs over, or None: the full
                                     vocabulary (or every output dimension of a tracr model)
    labels                           [B] int64 correct token id (or output id), or None
    extras                           task-specific tensors for the metric, keyed by name,
                                     each [B, ...] (one row per example: IOI's subject token
                                     id, Greater-Than's start year and year token ids)

The loss of every task is ``kl_loss``: KL(p_full || p_circuit) averaged over target
positions, with log-softmax over the candidates or the whole vocabulary (ARCHITECTURE.md
§2). A task's ``metric(logits, batch) -> Tensor [B]`` is per example, higher = the
behaviour is more present (accuracy, logit difference, probability difference); the
faithfulness of a circuit is (metric(circuit) - metric(empty)) / (metric(full) - metric(empty)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TaskBatch:
    input_ids: torch.Tensor
    corrupted_input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    target_mask: torch.Tensor
    candidates: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TaskBatch:
        def mv(t):
            return None if t is None else t.to(device)

        return replace(self, input_ids=mv(self.input_ids), corrupted_input_ids=mv(self.corrupted_input_ids),
                       attention_mask=mv(self.attention_mask), target_mask=mv(self.target_mask),
                       candidates=mv(self.candidates), labels=mv(self.labels),
                       extras={k: mv(v) for k, v in self.extras.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def target_log_probs(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """log-softmax at the target positions, over the candidates (or all outputs): [N, C or V] float32."""
    x = logits[batch.target_mask].float()
    if batch.candidates is not None:
        x = x[:, batch.candidates]
    return F.log_softmax(x, dim=-1)


def kl_loss(circuit_logits: torch.Tensor, full_logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """KL(p_full || p_circuit), summed over the vocabulary, averaged over target positions."""
    log_q = target_log_probs(circuit_logits, batch)
    log_p = target_log_probs(full_logits, batch)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def first_target_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Logits at each row's first target position: [B, V] float32 (where the label is read)."""
    has_target = batch.target_mask.any(dim=1)
    if not bool(has_target.all()):
        raise ValueError(f"batch.target_mask: every row needs a target position, rows "
                         f"{torch.nonzero(~has_target).flatten().tolist()} have none")
    first = batch.target_mask.int().argmax(dim=1)  # argmax returns the first maximum
    return logits[torch.arange(logits.shape[0], device=logits.device), first].float()


def pair_logit_diff(logits: torch.Tensor, batch: TaskBatch, other: str) -> torch.Tensor:
    """logit(label) - logit(extras[other]) at the first target position: [B]."""
    x = first_target_logits(logits, batch)
    return x.gather(1, batch.labels[:, None]).squeeze(1) - x.gather(1, batch.extras[other][:, None]).squeeze(1)


def top1_accuracy(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """1.0 where the label is the arg-max over the whole vocabulary at the first target position: [B]."""
    return (first_target_logits(logits, batch).argmax(dim=-1) == batch.labels).float()


class Task:
    """A task: ``batches`` to train and evaluate on, ``loss`` (KL by default) and ``metric``.

    Subclasses set ``name`` and ``metric_name`` and implement ``batches`` and ``metric``
    (and ``metrics`` when they report more than one measure, e.g. logit difference and
    accuracy); nothing about training lives here. Text tasks derive from
    :class:`~edgeprune_fast.tasks.examples.ExampleTask`, which implements ``batches``."""

    name: str = "task"
    metric_name: str = "metric"

    def batches(self, batch_size: int, split: str = "train") -> list[TaskBatch]:
        raise NotImplementedError

    def loss(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return kl_loss(circuit_logits, full_logits, batch)

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Every per-example measure the task reports ({name: [B]}); the first is ``metric``."""
        return {self.metric_name: self.metric(logits, batch)}
