"""The shared loss and metric helpers of base.py against hand-written maths."""

import math

import pytest
import torch

from edgeprune_fast.tasks.base import (
    TaskBatch,
    first_target_logits,
    kl_loss,
    pair_logit_diff,
    target_log_probs,
    top1_accuracy,
)


def batch_with_targets(target_mask, **kw) -> TaskBatch:
    B, S = target_mask.shape
    return TaskBatch(input_ids=torch.zeros(B, S, dtype=torch.long), corrupted_input_ids=None, attention_mask=None,
                     target_mask=target_mask, **kw)


def hand_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """sum_v p_v (log p_v - log q_v) from plain Python softmaxes."""
    zp, zq = sum(math.exp(x) for x in p_logits), sum(math.exp(x) for x in q_logits)
    p, q = [math.exp(x) / zp for x in p_logits], [math.exp(x) / zq for x in q_logits]
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_kl_loss_zero_for_identical_logits_and_positive_otherwise():
    tm = torch.zeros(3, 5, dtype=torch.bool)
    tm[:, -1] = True
    batch = batch_with_targets(tm)
    full = torch.randn(3, 5, 11)
    assert kl_loss(full, full.clone(), batch).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(full + 0.5, full, batch).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    other = full.clone()
    other[1, -1, 3] += 2.0
    assert kl_loss(other, full, batch).item() > 1e-4
    other_off_target = full.clone()
    other_off_target[:, 0] += torch.randn(3, 11)  # positions outside the target mask do not count
    assert kl_loss(other_off_target, full, batch).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_loss_equals_hand_written_kl_averaged_over_target_positions():
    g = torch.Generator().manual_seed(1)
    circuit, full = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    tm = torch.tensor([[False, True, True, False], [False, False, False, True]])
    positions = [(0, 1), (0, 2), (1, 3)]
    expected = sum(hand_kl(full[b, s].tolist(), circuit[b, s].tolist()) for b, s in positions) / len(positions)
    got = kl_loss(circuit, full, batch_with_targets(tm))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kl_loss_over_candidates_renormalises_over_those_tokens():
    g = torch.Generator().manual_seed(2)
    circuit, full = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    tm = torch.zeros(2, 3, dtype=torch.bool)
    tm[:, 2] = True
    cand = torch.tensor([7, 1, 4])
    expected = sum(hand_kl(full[b, 2, cand].tolist(), circuit[b, 2, cand].tolist()) for b in range(2)) / 2
    assert kl_loss(circuit, full, batch_with_targets(tm, candidates=cand)).item() == pytest.approx(expected, rel=1e-5)
    assert target_log_probs(full, batch_with_targets(tm, candidates=cand)).shape == (2, 3)


def test_first_target_logits_pair_logit_diff_and_accuracy_on_hand_made_logits():
    logits = torch.zeros(2, 4, 5)
    tm = torch.tensor([[False, True, True, False], [False, False, False, True]])
    logits[0, 1] = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.0])  # row 0 reads position 1 (its first target)
    logits[0, 2] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0])
    logits[1, 3] = torch.tensor([0.0, 0.0, 2.0, 5.0, 0.0])
    batch = batch_with_targets(tm, labels=torch.tensor([1, 2]), extras={"other": torch.tensor([2, 3])})
    assert torch.equal(first_target_logits(logits, batch), torch.stack([logits[0, 1], logits[1, 3]]))
    assert pair_logit_diff(logits, batch, "other").tolist() == [2.0, -3.0]
    assert top1_accuracy(logits, batch).tolist() == [1.0, 0.0]


def test_first_target_logits_rejects_rows_without_target():
    tm = torch.tensor([[False, True], [False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        first_target_logits(torch.zeros(2, 2, 3), batch_with_targets(tm))
