"""reference(..., states=False): the same logits as the capturing pass, no states."""

from __future__ import annotations

import pytest
import torch
from _tiny import ARCHS, VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_only_equal_the_capturing_pass(arch):
    pruned = EdgePrunedModel.from_hf(tiny_model(arch))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    logits, states = pruned.reference(ids, mask)
    only, none = pruned.reference(ids, mask, states=False)
    assert none is None and states.shape[0] == pruned.graph.n_writers
    torch.testing.assert_close(only, logits, rtol=0, atol=0)
