"""Greater-Than: aligned 17YY/1701 pairs, the year tokens, the probability-difference metric."""

import json

import pytest
import torch

from edgeprune_fast.tasks import GreaterThanTask, make_greater_than
from edgeprune_fast.tasks.examples import TASK_DATA_DIR


@pytest.fixture(scope="module")
def task(tokenizer):
    return make_greater_than(tokenizer, n_examples=40, n_validation=10, seed=5)


def test_pairs_are_aligned_and_differ_only_in_the_start_year(task, tokenizer):
    assert isinstance(task, GreaterThanTask) and task.metric_name == "prob_diff"
    for split in ("train", "validation"):
        for batch in task.batches(8, split):
            assert batch.labels is None and batch.input_ids.shape == batch.corrupted_input_ids.shape
            for i in range(len(batch)):
                n = int(batch.attention_mask[i].sum()) if batch.attention_mask is not None else batch.input_ids.shape[1]
                clean, corrupted = batch.input_ids[i, :n].tolist(), batch.corrupted_input_ids[i, :n].tolist()
                assert torch.nonzero(batch.target_mask[i]).flatten().tolist() == [n - 1]
                text, corrupted_text = tokenizer.decode(clean), tokenizer.decode(corrupted)
                yy = int(batch.extras["year"][i])
                century = text.rsplit(" ", 1)[1]
                assert century in {"11", "12", "13", "14", "15", "16", "17"}
                assert f" {century}{yy:02d} " in text and f" {century}01 " in corrupted_text
                assert 2 <= yy <= 98
                diff = [k for k in range(n) if clean[k] != corrupted[k]]
                assert [tokenizer.decode([clean[k]]) for k in diff] == [f"{yy:02d}"]
                assert [tokenizer.decode([corrupted[k]]) for k in diff] == ["01"]


def test_year_ids_are_the_hundred_two_digit_tokens(task, tokenizer):
    batch = task.batches(4)[0]
    assert batch.extras["year_ids"].shape == (4, 100)
    assert tokenizer.convert_ids_to_tokens(batch.extras["year_ids"][0].tolist()) == [f"{y:02d}" for y in range(100)]
    assert batch.candidates is None  # KL over the whole vocabulary by default
    narrow = make_greater_than(tokenizer, n_examples=4, seed=5, kl_over_years=True)
    assert torch.equal(narrow.batches(4)[0].candidates, batch.extras["year_ids"][0])


def test_prob_diff_on_hand_made_logits(task, tokenizer):
    batch = task.batches(3)[0]
    B, S = batch.input_ids.shape
    V = len(tokenizer)
    logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(0))
    got = task.metric(logits, batch)
    pos = batch.target_mask.int().argmax(1)
    for i in range(B):
        p = torch.softmax(logits[i, pos[i]].double(), dim=0)
        yy = int(batch.extras["year"][i])
        ids = batch.extras["year_ids"][i]
        expected = sum(float(p[ids[y]]) * (1 if y > yy else -1) for y in range(100))
        assert got[i].item() == pytest.approx(expected, abs=1e-6)
    # all mass on the years just above / at the start year: +1 / -1
    logits = torch.full((B, S, V), -1e4)
    for i in range(B):
        yy = int(batch.extras["year"][i])
        logits[i, pos[i], batch.extras["year_ids"][i, yy + 1 if i % 2 == 0 else yy]] = 0.0
    assert task.metric(logits, batch).tolist() == pytest.approx([1.0 if i % 2 == 0 else -1.0 for i in range(B)])


def test_deterministic_in_seed(tokenizer, task):
    again = make_greater_than(tokenizer, n_examples=40, n_validation=10, seed=5)
    assert [e.input_ids for e in again.examples("train")] == [e.input_ids for e in task.examples("train")]
    other = make_greater_than(tokenizer, n_examples=40, n_validation=10, seed=6)
    assert [e.input_ids for e in other.examples("train")] != [e.input_ids for e in task.examples("train")]


def test_years_that_are_not_single_tokens_are_an_error(tokenizer):
    data = json.loads((TASK_DATA_DIR / "greater_than.json").read_text())
    data["centuries"] = ["1"]  # " 1" + "00" -> " 10" "0": the two digits do not stay one token
    with pytest.raises(ValueError, match="every two-digit year to be one token after 'the year 1'"):
        make_greater_than(tokenizer, n_examples=4, data=data)
