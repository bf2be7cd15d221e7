"""The optional fused weight views of the adapters (LayerSpec.W_QKV / b_QKV) are exactly the
per-role views stacked, and views of the model's parameters (no copies)."""

from __future__ import annotations

import pytest
import torch
from _tiny import ARCHS, tiny_model

from edgeprune_fast.models import adapter_for


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_qkv_equals_stacked_roles(arch):
    adapter = adapter_for(tiny_model(arch))
    for spec in adapter.layers:
        if spec.W_QKV is None:  # the readers then project per role
            assert spec.b_QKV is None
            continue
        assert torch.equal(spec.W_QKV, torch.cat([spec.W_Q, spec.W_K, spec.W_V]))
        assert spec.W_QKV.untyped_storage().data_ptr() == spec.W_Q.untyped_storage().data_ptr()
        if spec.b_Q is not None:
            assert torch.equal(spec.b_QKV, torch.cat([spec.b_Q, spec.b_K, spec.b_V]))


def test_gpt2_has_the_fused_view():
    assert all(s.W_QKV is not None for s in adapter_for(tiny_model("gpt2")).layers)
