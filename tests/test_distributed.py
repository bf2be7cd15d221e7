"""Data parallel over 2 processes (gloo, torch.multiprocessing) on a tiny Llama: the same
masks after N steps as one process on the same global batches; every process holds the
same state; rank 0's checkpoint resumes in one process."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from edgeprune_fast.distributed import DataParallel
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.base import Task, TaskBatch
from edgeprune_fast.train import NonFiniteLoss, TrainConfig, Trainer
from tests.models._tiny import VOCAB, tiny_model

B, S, STEPS = 4, 6, 3


class KLTask(Task):
    name = "kl"


def batches() -> list[TaskBatch]:
    g = torch.Generator().manual_seed(7)
    out = []
    for rows in (B, B - 1):  # the second splits unevenly over 2 processes (2 + 1 rows)
        target = torch.zeros(rows, S, dtype=torch.bool)
        target[:, -1] = True
        target[2:, 1:4] = True  # the second half has more target positions: the average must be weighted
        out.append(TaskBatch(torch.randint(3, VOCAB, (rows, S), generator=g),
                             torch.randint(3, VOCAB, (rows, S), generator=g), None, target))
    return out


def trainer(dp: DataParallel | None, out_dir=None) -> Trainer:
    model = EdgePrunedModel.from_hf(tiny_model("llama"), init=1.0, init_std=0.5)  # tiny_model seeds: same init
    if dp is not None and dp.rank:
        model.masks.reset(3.0, 1.0)  # another init on the other ranks: the trainer's broadcast must align them
    config = TrainConfig(target_edge_sparsity=0.5, steps=STEPS, sparsity_warmup=2, lr_warmup=1, lr_edge=0.1,
                         lr_node=0.1, lr_lambda=0.1, progress=False)
    return Trainer(model, KLTask(), batches(), config, out_dir=out_dir, data_parallel=dp)


def join_gloo(rank: int, world: int, port: int) -> DataParallel:
    """A spawned worker joins the process group as torchrun would set it up (one thread each)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return DataParallel.from_env("gloo")


def _worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    dp = join_gloo(rank, world, port)
    try:
        t = trainer(dp, out_dir)
        rows = [t.train_step() for _ in range(steps)]
        t.save_checkpoint()
        state = {k: v.contiguous() for k, v in t.model.mask_state_dict().items()}
        state["log.kl"] = torch.tensor([r["kl"] for r in rows], dtype=torch.float64)
        state["log.kl_this_process"] = torch.tensor([r["kl_this_process"] for r in rows], dtype=torch.float64)
        state["adam.exp_avg_sq.0"] = t.optimizer.state[t.optimizer.param_groups[0]["params"][0]]["exp_avg_sq"]
        save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dp.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(2, _free_port(), str(out), STEPS - 1), nprocs=2, join=True)
    return out


def test_two_processes_equal_one_process_on_the_global_batch(two_process_run):
    torch.set_num_threads(1)
    single = trainer(None)
    single_kl = torch.tensor([single.train_step()["kl"] for _ in range(STEPS - 1)], dtype=torch.float64)
    ranks = [load_file(str(two_process_run / f"rank{r}.safetensors")) for r in range(2)]
    local_kl = [ranks[r].pop("log.kl_this_process") for r in range(2)]
    assert (local_kl[0] - local_kl[1]).abs().max() > 1e-4  # each process's own share differs...
    for k in ranks[0]:  # ...but every process holds the same state and logs the same KL, bit for bit
        torch.testing.assert_close(ranks[1][k], ranks[0][k], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0].pop("log.kl"), single_kl, rtol=1e-5, atol=1e-7)  # the global batch's
    ranks[1].pop("log.kl")
    ref = single.model.mask_state_dict()
    moved = 0.0
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - trainer(None).model.mask_state_dict()[k]).abs().max()))
    assert moved > 1e-3  # the masks did train
    exp_avg_sq = single.optimizer.state[single.optimizer.param_groups[0]["params"][0]]["exp_avg_sq"]
    torch.testing.assert_close(ranks[0]["adam.exp_avg_sq.0"], exp_avg_sq, rtol=1e-4, atol=1e-12)


def test_checkpoint_written_once_resumes_in_one_process(two_process_run):
    """Rank 0 wrote the checkpoint after STEPS - 1 steps on 2 processes; one process resumes
    it for the last step and ends where an uninterrupted one-process run ends."""
    torch.set_num_threads(1)
    assert sorted(p.name for p in two_process_run.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint.safetensors"]
    assert_resumes_like_a_straight_run(two_process_run / "checkpoint")


def assert_resumes_like_a_straight_run(checkpoint) -> None:
    """One process resumed from ``checkpoint`` (written after STEPS - 1 steps) and stepped once
    ends with the masks of one process that took STEPS steps straight."""
    resumed = trainer(None)
    resumed.load_checkpoint(checkpoint)
    resumed.train_step()
    straight = trainer(None)
    for _ in range(STEPS):
        straight.train_step()
    for k, v in straight.model.mask_state_dict().items():
        torch.testing.assert_close(resumed.model.mask_state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_shard_and_bad_input():
    dp = DataParallel(rank=1, world_size=2, device=torch.device("cpu"))
    b = batches()[0]
    part = dp.shard(b)
    assert torch.equal(part.input_ids, b.input_ids[2:]) and torch.equal(part.target_mask, b.target_mask[2:])
    # unequal slices: the first B % P processes take one row more
    assert [DataParallel(r, 3, torch.device("cpu")).rows(8) for r in range(3)] == [slice(0, 3), slice(3, 6),
                                                                                 slice(6, 8)]
    assert dp.rows(3) == slice(2, 3)
    with pytest.raises(ValueError, match=r"at least one row per process \(2\), got a global batch of 1"):
        dp.rows(1)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        with pytest.raises(ValueError, match="torchrun"):
            DataParallel.from_env()
    finally:
        os.environ.update(env)


class NaNOnRankOne(KLTask):
    """The task loss is NaN on process 1 only."""

    def loss(self, circuit_logits, full_logits, batch):
        loss = super().loss(circuit_logits, full_logits, batch)
        return loss * float("nan") if torch.distributed.get_rank() == 1 else loss


def _nan_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dp = join_gloo(rank, world, port)
    try:
        t = trainer(dp)
        t.task = NaNOnRankOne()
        try:
            t.train_step()
            message = "no error"
        except NonFiniteLoss as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dp.close()


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """Process 1's loss is NaN: both raise NonFiniteLoss in the same step (process 0 says it
    came from another process) instead of process 0 waiting forever in the all_reduce."""
    ctx = mp.spawn(_nan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a process was still running 120 s after the other's non-finite loss")
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert got[0].startswith("step 1: the loss is not finite on another process (here it is 0."), got[0]
    assert got[1].startswith("step 1: the loss is nan on process 1"), got[1]
