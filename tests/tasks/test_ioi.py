"""IOI: aligned ABC corruptions, labels at the last position, the logit-difference metric."""

import json

import pytest
import torch

from edgeprune_fast.tasks import IOITask, make_ioi
from edgeprune_fast.tasks.examples import TASK_DATA_DIR

NAMES = json.loads((TASK_DATA_DIR / "ioi.json").read_text())["names"]


def rows(batch):
    """Per row: unpadded clean ids, corrupted ids, target positions."""
    n = batch.attention_mask.sum(1).tolist() if batch.attention_mask is not None else [batch.input_ids.shape[1]] * len(batch)
    return [(batch.input_ids[i, :k].tolist(), batch.corrupted_input_ids[i, :k].tolist(),
             torch.nonzero(batch.target_mask[i]).flatten().tolist()) for i, k in enumerate(n)]


@pytest.fixture(scope="module")
def task(tokenizer):
    return make_ioi(tokenizer, n_examples=48, n_validation=16, seed=3)


def test_pairs_are_aligned_abc_corruptions_with_the_io_as_label(task, tokenizer):
    orders = set()
    for batch in task.batches(8):
        assert batch.input_ids.shape == batch.corrupted_input_ids.shape
        for i, (clean, corrupted, targets) in enumerate(rows(batch)):
            assert targets == [len(clean) - 1]
            if batch.attention_mask is not None:  # right padding: pads only after the prompt
                assert batch.input_ids[i, len(clean):].eq(task.pad_id).all()
            io, s = tokenizer.decode([batch.labels[i]]), tokenizer.decode([batch.extras["s_id"][i]])
            assert io.startswith(" ") and s.startswith(" ") and io != s
            text = tokenizer.decode(clean)
            assert text.count(io + " ") + text.count(io + ",") == 1 and text.count(s) == 2
            assert not text.endswith(io) and text.endswith(" to")
            diff = [k for k in range(len(clean)) if clean[k] != corrupted[k]]
            assert [tokenizer.decode([clean[k]]) for k in diff] in ([io, s, s], [s, io, s])
            orders.add("ABBA" if tokenizer.decode([clean[diff[0]]]) == io else "BABA")
            abc = [tokenizer.decode([corrupted[k]]) for k in diff]
            assert len(set(abc)) == 3 and not set(abc) & {io, s}
            assert all(name.strip() in NAMES for name in abc)
    assert orders == {"ABBA", "BABA"}


def test_multi_token_names_are_filtered_out(task, tokenizer):
    texts = [tokenizer.decode(b.input_ids[i]) + tokenizer.decode(b.corrupted_input_ids[i])
             for split in ("train", "validation") for b in task.batches(64, split) for i in range(len(b))]
    assert not any("Victoria" in t or "Jennifer" in t for t in texts)


def test_too_few_single_token_names_is_a_clear_error(tokenizer):
    data = json.loads((TASK_DATA_DIR / "ioi.json").read_text())
    data["names"] = ["Mary", "John", "Anna", "Victoria", "Jennifer", "Christopher"]
    with pytest.raises(ValueError, match="only 3 of the 6 IOI names are single tokens .* at least 5"):
        make_ioi(tokenizer, n_examples=4, data=data)


def test_splits_sizes_distinct_and_deterministic(tokenizer, task):
    train, val = task.examples("train"), task.examples("validation")
    assert (len(train), len(val)) == (48, 16)
    assert len({e.input_ids for e in train + val}) == 64
    again = make_ioi(tokenizer, n_examples=48, n_validation=16, seed=3)
    assert [e.input_ids for e in again.examples("train")] == [e.input_ids for e in train]
    assert [e.corrupted_input_ids for e in again.examples("validation")] == [e.corrupted_input_ids for e in val]
    other = make_ioi(tokenizer, n_examples=48, n_validation=16, seed=4)
    assert [e.input_ids for e in other.examples("train")] != [e.input_ids for e in train]


def test_works_with_a_bos_tokenizer(bos_tokenizer):
    batch = make_ioi(bos_tokenizer, n_examples=4, seed=0).batches(4)[0]
    assert batch.input_ids[:, 0].eq(bos_tokenizer.bos_token_id).all()
    assert batch.corrupted_input_ids[:, 0].eq(bos_tokenizer.bos_token_id).all()


def test_metric_on_hand_made_logits(task, tokenizer):
    batch = task.batches(4)[0]
    B, S = batch.input_ids.shape
    logits = torch.zeros(B, S, len(tokenizer))
    pos = batch.target_mask.int().argmax(1)
    for i in range(B):
        logits[i, pos[i], batch.labels[i]] = 2.0 + i
        logits[i, pos[i], batch.extras["s_id"][i]] = 1.0
    logits[0, pos[0], 0] = 10.0  # row 0: another token wins the arg-max
    m = task.metrics(logits, batch)
    assert isinstance(task, IOITask) and task.metric_name == "logit_diff"
    assert m["logit_diff"].tolist() == [1.0 + i for i in range(B)]
    assert torch.equal(task.metric(logits, batch), m["logit_diff"])
    assert m["accuracy"].tolist() == [0.0] + [1.0] * (B - 1)
