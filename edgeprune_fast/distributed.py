"""Data-parallel edge pruning over processes with torch.distributed (launched by ``torchrun``).

Every process holds the model and the masks, takes its slice of each global batch
(rows ``rank * B / P ...``, P processes) and, after backward, the mask and Lagrange
multiplier gradients are averaged with one ``torch.distributed.all_reduce`` (weighted by
each slice's number of target positions, so that the result is the gradient of the loss
on the whole global batch: the task loss is a mean over target positions, the sparsity
terms are the same on every process). All processes draw the same hard-concrete noise
(the trainer's random stream is seeded identically), so P processes take the same steps
as one process on the global batch, and every process holds the same masks, optimiser
state and random state: a checkpoint is written once (rank 0) and resumes on any number
of processes.

    torchrun --nproc_per_node 4 my_prune.py          # my_prune.py:
        dp = DataParallel.from_env()                 # gloo on CPU, nccl with CUDA
        trainer = Trainer(model.to(dp.device), task, batches, config, data_parallel=dp)

Weights are replicated, not sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``,
present in this torch). Tried on CPU/gloo with 2 processes on a tiny Llama (each decoder
layer and the root wrapped, weights frozen): ``fully_shard`` works and turns every
parameter into a sharded DTensor, but the edge-pruned forward then fails at its first op,
``adapter.embed_tokens(ids)``: "aten.embedding.default got mixed torch.Tensor and DTensor".
FSDP2 gathers a module's parameters in hooks around that module's ``forward`` (and its
backward), and the edge-pruned forward never calls the root's or an attention module's
``forward``: it calls the embedding, norms and MLPs as submodules and reads per-head views
of W_Q, W_K, W_V, W_O that the adapter takes once (adapters.py), which after sharding are
views of the DTensor shards, not of the gathered weights. Making it work needs, per layer,
``FSDPModule.unshard()`` before the attention, head views rebuilt from the gathered
parameters, ``reshard()`` after, and the same again in the checkpointed recomputation and
the backward (whose input gradients need W); that is not done yet. The memory planner's
``n_gpus`` models that sharded layout (edgeprune_fast/plan.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .tasks.base import TaskBatch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass
class DataParallel:
    """One process's view of the process group: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls, backend: str | None = None) -> DataParallel:
        """Join the process group that ``torchrun`` describes in the environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); backend: nccl with CUDA, else gloo."""
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing and not dist.is_initialized():
            raise ValueError(f"environment: expected the torchrun variables {', '.join(TORCHRUN_VARS)}, "
                             f"missing {', '.join(missing)} (launch with torchrun --nproc_per_node N ...)")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    # -- data ------------------------------------------------------------------------------------
    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of ``batch_size`` (equal slices)."""
        if batch_size % self.world_size:
            raise ValueError(f"batch: expected a global batch size divisible by the {self.world_size} processes, "
                             f"got {batch_size}")
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def shard(self, batch: TaskBatch) -> TaskBatch:
        """This process's slice of a global TaskBatch (per-row tensors sliced; the candidate
        list and other non-row tensors shared)."""
        B = len(batch)
        rows = self.rows(B)

        def cut(t):
            return t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B else t

        return dataclasses.replace(batch, input_ids=cut(batch.input_ids),
                                   corrupted_input_ids=cut(batch.corrupted_input_ids),
                                   attention_mask=cut(batch.attention_mask), target_mask=cut(batch.target_mask),
                                   labels=cut(batch.labels), extras={k: cut(v) for k, v in batch.extras.items()})

    # -- gradients and state ---------------------------------------------------------------------
    @torch.no_grad()
    def all_reduce_gradients(self, params: Iterable[torch.Tensor], weight: float | torch.Tensor = 1.0) -> None:
        """grad <- sum over processes of (weight_p / sum weight) * grad_p, in one all_reduce of
        the flattened gradients. ``weight``: this process's share of the loss's mean (its number
        of target positions); equal weights give the plain average."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        dev = params[0].grad.device
        w = torch.as_tensor(weight, dtype=torch.float64, device=dev).reshape(1)
        total = w.clone()
        dist.all_reduce(total)
        if not float(total) > 0:
            raise ValueError(f"weight: expected positive weights summing over processes, got a total of {float(total)}")
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params]) * (w / total)
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    @torch.no_grad()
    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Make every process start from rank 0's values (e.g. the masks after their random init)."""
        for p in params:
            dist.broadcast(p.data, src=0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
