"""reference(..., states=False): the same logits as the capturing pass, no states;
reference(..., logits=False): the same states, with the unembedding never run."""

from __future__ import annotations

import pytest
import torch
from _tiny import ARCHS, VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel


def _inputs():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_only_equal_the_capturing_pass(arch):
    pruned = EdgePrunedModel.from_hf(tiny_model(arch))
    ids, mask = _inputs()
    logits, states = pruned.reference(ids, mask)
    only, none = pruned.reference(ids, mask, states=False)
    assert none is None and states.shape[0] == pruned.graph.n_writers
    torch.testing.assert_close(only, logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_states_only_equal_the_full_pass_without_the_unembedding(arch):
    pruned = EdgePrunedModel.from_hf(tiny_model(arch))
    ids, mask = _inputs()
    calls = []
    handle = pruned.adapter.unembed.register_forward_hook(lambda *args: calls.append(1))
    try:
        _, states = pruned.reference(ids, mask)
        assert len(calls) == 1
        none, only = pruned.reference(ids, mask, logits=False)
        assert len(calls) == 1  # the states-only pass stopped before the LM head
    finally:
        handle.remove()
    assert none is None
    torch.testing.assert_close(only, states, rtol=0, atol=0)


def test_asking_for_nothing_is_an_error():
    pruned = EdgePrunedModel.from_hf(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="states, logits: expected at least one of them True"):
        pruned.reference(_inputs()[0], states=False, logits=False)
