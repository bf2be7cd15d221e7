"""bfloat16 end to end: writer states and mixing in the model dtype, masks and their
gradients in float32, results close to the float32 run (judged against the HF model's own
bf16-vs-fp32 error, as flash-attention's tests judge low-precision kernels)."""

import pytest
import torch
import torch.nn.functional as F
from _tiny import VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel


def _run(arch: str, dtype: torch.dtype, ids, cids, **kwargs):
    hf = tiny_model(arch, dtype=dtype)
    torch.manual_seed(1)
    pruned = EdgePrunedModel.from_hf(hf, init=1.0, init_std=1.0, **kwargs).train()
    full, _ = pruned.reference(ids)
    corrupted = pruned.reference(cids)[1]
    torch.manual_seed(2)  # the same mask noise in every run
    out = pruned(ids, corrupted_writers=corrupted, training=True)
    kl = F.kl_div(out.logits.float().log_softmax(-1), full.float().log_softmax(-1), log_target=True,
                  reduction="batchmean")
    (kl + out.edge_sparsity).backward()
    return hf, pruned, out, corrupted, [p.grad for p in pruned.masks.parameters()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_forward_backward_close_to_fp32(arch):
    ids, cids = torch.randint(3, VOCAB, (3, 9)), torch.randint(3, VOCAB, (3, 9))
    hf32, _, out32, _, g32 = _run(arch, torch.float32, ids, cids)
    hf16, pruned16, out16, corrupted16, g16 = _run(arch, torch.bfloat16, ids, cids)
    # dtypes: states and logits in bf16, masks and their gradients float32
    assert corrupted16.dtype == torch.bfloat16 and out16.logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pruned16.masks.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g16)
    # the HF model's own bf16 error sets the scale
    with torch.no_grad():
        hf_err = (hf16(ids).logits.float() - hf32(ids).logits).abs().max()
    err = (out16.logits.float() - out32.logits).abs().max()
    assert err <= 3 * hf_err + 1e-3, (err, hf_err)
    assert err > 0  # it did run in bf16
    for a, b in zip(g16, g32):
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99, cos
        assert (a - b).norm() <= 0.1 * b.norm()


def test_bf16_checkpointed_and_streamed_equal_plain_bf16():
    ids, cids = torch.randint(3, VOCAB, (2, 7)), torch.randint(3, VOCAB, (2, 7))
    _, _, plain, _, g_plain = _run("llama", torch.bfloat16, ids, cids)
    _, _, other, _, g_other = _run("llama", torch.bfloat16, ids, cids, checkpoint_layers=True, corrupted_on_cpu=True)
    torch.testing.assert_close(other.logits, plain.logits, rtol=0, atol=0)
    for a, b in zip(g_other, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_weights_get_no_gradient_work():
    """The adapter's per-head weight views are taken after freezing: no grad_fn, so backward
    computes no weight gradients (they cost 3 d_model^2 per layer, see plan.py)."""
    pruned = EdgePrunedModel.from_hf(tiny_model("llama"))
    for spec in pruned.adapter.layers:
        for w in (spec.W_Q, spec.W_K, spec.W_V, spec.W_O):
            assert not w.requires_grad and w.grad_fn is None
