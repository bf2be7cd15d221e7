"""Tokenisation, alignment checks, right padding and batching shared by the text tasks."""

import pytest
import torch

from edgeprune_fast.tasks.examples import EncodedExample, Example, ExampleTask, TextEncoder, collate, split_sizes


def test_encoder_rejects_non_tokenizers():
    with pytest.raises(ValueError, match="tokenizer: expected a Hugging Face tokenizer"):
        TextEncoder(object())


def test_encoder_keeps_leading_special_tokens(tokenizer, bos_tokenizer):
    assert TextEncoder(tokenizer).prefix == ()
    enc = TextEncoder(bos_tokenizer)
    assert enc.prefix == (bos_tokenizer.bos_token_id,)
    assert enc.ids("When Mary") == bos_tokenizer("When Mary")["input_ids"]


def test_continuation_is_tokenised_in_context(tokenizer):
    enc = TextEncoder(tokenizer)
    ids = enc.continuation("When Mary and John went to the store, John gave a drink to", " Mary", "ex")
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠMary"]
    assert enc.is_single_token(" Mary", "When")
    assert not enc.is_single_token(" Victoria", "When")  # left out of the test tokenizer's corpus
    with pytest.raises(ValueError, match="ex: the continuation '' has no tokens"):
        enc.continuation("When", "", "ex")


def test_encode_raises_on_length_mismatch_naming_the_example(tokenizer):
    enc = TextEncoder(tokenizer)
    ex = Example("When Mary went", "When Jennifer went", " home", where="example 7")
    n_clean, n_corr = len(enc.ids(ex.clean)), len(enc.ids(ex.corrupted))
    assert n_clean != n_corr
    with pytest.raises(ValueError, match=f"example 7: .* got {n_clean} tokens \\(clean\\) and {n_corr} tokens"):
        enc.encode(ex)


def test_encode_reads_the_last_prompt_token(tokenizer):
    enc = TextEncoder(tokenizer)
    e = enc.encode(Example("When Mary met John, John thanked", "When Anna met Paul, Kate thanked", " Mary",
                           where="x", token_extras={"s_id": " John"}, extras={"k": 3}))
    assert e.target_positions == (len(e.input_ids) - 1,)
    assert tokenizer.decode([e.label]) == " Mary" and tokenizer.decode([e.extras["s_id"]]) == " John"
    assert e.extras["k"] == 3


def test_collate_pads_on_the_right_and_targets_follow_each_row():
    a = EncodedExample((5, 6, 7), (8, 9, 10), (2,), 11, "a", {"x": 1, "v": (0.5, 1.5)})
    b = EncodedExample((5, 6, 7, 12, 13), (8, 9, 10, 14, 15), (3, 4), 16, "b", {"x": 2, "v": (2.5, 3.5)})
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 12, 13]]
    assert batch.corrupted_input_ids.tolist() == [[8, 9, 10, 0, 0], [8, 9, 10, 14, 15]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.target_mask.tolist() == [[False, False, True, False, False], [False, False, False, True, True]]
    assert batch.labels.tolist() == [11, 16]
    assert batch.extras["x"].dtype == torch.long and batch.extras["x"].tolist() == [1, 2]
    assert batch.extras["v"].dtype == torch.float32 and batch.extras["v"].shape == (2, 2)
    assert collate([a, a], pad_id=0).attention_mask is None  # nothing padded: no mask
    with pytest.raises(ValueError, match="same extras keys"):
        collate([a, EncodedExample((1,), (1,), (0,), 1, "c")], pad_id=0)
    assert collate([a, EncodedExample((1,), (1,), (0,), None, "c", {"x": 0, "v": (0.0, 0.0)})], 0).labels is None


def test_example_task_batches_in_order_and_checks_arguments():
    exs = [EncodedExample((i, i + 1), (i, i + 2), (1,), i, str(i)) for i in range(5)]

    class T(ExampleTask):
        name = "t"

    task = T({"train": exs, "validation": exs[:1]}, pad_id=0)
    sizes = [len(b) for b in task.batches(2)]
    assert sizes == [2, 2, 1]
    assert torch.cat([b.labels for b in task.batches(2)]).tolist() == [0, 1, 2, 3, 4]
    assert len(task.batches(8, "validation")) == 1
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'validation'\], got 'test'"):
        task.batches(2, "test")
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        task.batches(0)


def test_split_sizes():
    assert split_sizes(8, None) == (8, 2)
    assert split_sizes(3, None) == (3, 1)
    assert split_sizes(3, 0) == (3, 0)
    with pytest.raises(ValueError, match="n_examples: expected a positive integer"):
        split_sizes(0, None)
    with pytest.raises(ValueError, match="n_validation"):
        split_sizes(4, -1)
