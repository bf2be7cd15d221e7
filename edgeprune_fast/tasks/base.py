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
    extras                           task-specific tensors for the metric (e.g. IOI's
                                     subject token ids, Greater-Than's start year), keyed by name

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


class Task:
    """A task: ``batches`` to train and evaluate on, ``loss`` (KL by default) and ``metric``.

    Subclasses set ``name`` and ``metric_name`` and implement ``examples``/``batches`` and
    ``metric``; nothing about training lives here."""

    name: str = "task"
    metric_name: str = "metric"

    def batches(self, batch_size: int, split: str = "train") -> list[TaskBatch]:
        raise NotImplementedError

    def loss(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return kl_loss(circuit_logits, full_logits, batch)

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        raise NotImplementedError
