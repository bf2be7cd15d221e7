"""Task batches through real models loaded from disk (tiny_model_dir): right padding leaves
every example's logits unchanged, and the trainer's contract (loss, metric) holds."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks import get_task


def test_tiny_model_dir_round_trips(tiny_model_dir, tokenizer):
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "When Mary and John went to the store, John gave a drink to"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == len(tokenizer) and model.config.n_layer == 2


def test_right_padding_leaves_each_example_unchanged(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = get_task("ioi", tokenizer, n_examples=8, seed=0).batches(8)[0]
    assert batch.attention_mask is not None and not bool(batch.attention_mask.all())  # the test needs padding
    with torch.no_grad():
        padded = model(batch.input_ids, attention_mask=batch.attention_mask).logits
        for i in range(len(batch)):
            n = int(batch.attention_mask[i].sum())
            alone = model(batch.input_ids[i:i + 1, :n]).logits[0]
            pos = int(torch.nonzero(batch.target_mask[i]))
            torch.testing.assert_close(padded[i, pos], alone[pos], rtol=1e-5, atol=1e-5)


def test_loss_and_metric_through_the_edge_pruned_model(tiny_model_dir, tokenizer):
    model = EdgePrunedModel.from_pretrained(tiny_model_dir)
    task = get_task("gendered-pronouns", tokenizer, n_examples=8, seed=0)
    batch = task.batches(8)[0]
    with torch.no_grad():
        full, _ = model.reference(batch.input_ids, batch.attention_mask)
        corrupted, _ = model.reference(batch.corrupted_input_ids, batch.attention_mask)
        model.set_circuit(list(model.graph.edges()))  # every edge: the full model
        out = model(batch.input_ids, batch.corrupted_input_ids, batch.attention_mask, training=False)
        assert task.loss(out.logits, full, batch).item() < 1e-6
        model.set_circuit([])  # no edge: every reader sees the corrupted run
        empty = model(batch.input_ids, batch.corrupted_input_ids, batch.attention_mask, training=False)
    t = batch.target_mask
    torch.testing.assert_close(empty.logits[t], corrupted[t], rtol=1e-4, atol=1e-5)
    assert task.loss(empty.logits, full, batch).item() > 1e-7  # small: a random tiny model is nearly uniform
    torch.testing.assert_close(task.metric(empty.logits, batch), task.metric(corrupted, batch), rtol=1e-4, atol=1e-4)
    assert task.metric(out.logits, batch).shape == (8,)
