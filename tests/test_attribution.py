"""EAP / EAP-IG scores of the fused forward against a slow reference from the maths.

The reference (tests/models/_slow_reference.py) is an unfused forward whose every reader
input is an explicit sum over its writers with one scalar mask per edge moving the edge along
its clean - corrupted difference: x_r = sum_w y_w + (z_wr - 1) delta_w. Its autograd
gradient in z at z = 1 is the edge score (the attribution module's docstring); the IG
variants interpolate the embeddings (inputs) or one writer group at a time (activations)
through the reference's ``replace``. Float64 models: agreement to 1e-5 (seen: 3e-16 for GPT-2;
3e-8 for Llama and Qwen2, whose HF RMSNorm modules, used by the reference, compute in float32).
"""

from __future__ import annotations

import pytest
import torch

from edgeprune_fast.attribution import _writer_groups, attribute, check_method_metric, default_metric
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.base import TaskBatch
from tests.models._slow_reference import slow_forward
from tests.models._tiny import VOCAB, tiny_model


class ToyTask:
    """Labels and a contrasting token per row (as IOI's)."""

    name = "toy"
    contrast_key = "other"


class NoContrast:
    name = "plain"


def toy_batch(B=3, S=7, padded=True, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    cids = ids.clone()
    cids[:, 1] = torch.randint(3, VOCAB, (B,), generator=g)  # corrupted: another token at position 1 and 3
    cids[:, 3] = torch.randint(3, VOCAB, (B,), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lengths = [S] * B
    if padded:
        lengths[-1] = S - 2
        mask[-1, S - 2:] = 0
    target = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        target[b, n - 1] = True
    return TaskBatch(ids, cids, mask if padded else None, target, None,
                     torch.randint(3, VOCAB, (B,), generator=g), {"other": torch.randint(3, VOCAB, (B,), generator=g)})


def ref_metric(metric, logits, full, batch):
    first = batch.target_mask.int().argmax(1)
    x = logits[torch.arange(len(first)), first]
    if metric == "logit-diff":
        return (x.gather(1, batch.labels[:, None]) - x.gather(1, batch.extras["other"][:, None])).mean()
    if metric == "log-prob":
        return x.log_softmax(-1).gather(1, batch.labels[:, None]).mean()
    q, p = logits[batch.target_mask].log_softmax(-1), full[batch.target_mask].log_softmax(-1)
    return -(p.exp() * (p - q)).sum(-1).mean()


def ref_scores(hf, graph, batch, method, metric, steps, split_embeds=False, kv_per_query_head=False):
    """The scores [E] in graph order from autograd through the slow forward."""
    edges = [(e.writer, e.reader) for e in graph.edges()]
    writers = graph.writer_names()
    kw = dict(split_embeds=split_embeds, attention_mask=batch.attention_mask, kv_per_query_head=kv_per_query_head)
    ones = {e: torch.tensor(1.0, dtype=torch.float64) for e in edges}
    zeros = {w: 0.0 for w in writers}
    with torch.no_grad():
        full, clean = slow_forward(hf, batch.input_ids, None, edge_z=ones, directions=zeros, **kw)
        _, corr = slow_forward(hf, batch.corrupted_input_ids, None, edge_z=ones, directions=zeros, **kw)
    delta = {w: clean[w] - corr[w] for w in writers}
    if method == "eap":
        runs = [{}]
    elif method == "eap-ig":
        emb = [w for w in writers if "embeds" in w]
        runs = [{w: corr[w] + k / steps * delta[w] for w in emb} for k in range(steps)]
    else:
        runs = [{w: corr[w] + k / steps * delta[w] for w in writers[first:first + n]}
                for first, n in _writer_groups(graph) for k in range(1, steps + 1)]
    total = torch.zeros(len(edges), dtype=torch.float64)
    for replace in runs:
        z = {e: torch.tensor(1.0, dtype=torch.float64, requires_grad=True) for e in edges}
        logits, _ = slow_forward(hf, batch.input_ids, None, edge_z=z, directions=delta, replace=replace, **kw)
        ref_metric(metric, logits, full, batch).backward()
        total += torch.stack([torch.zeros((), dtype=torch.float64) if z[e].grad is None else z[e].grad for e in edges])
    return total / len(runs)


CASES = [("gpt2", "eap", "logit-diff"), ("gpt2", "eap-ig", "kl"), ("gpt2", "eap-ig-activations", "log-prob"),
         ("llama", "eap", "log-prob"), ("llama", "eap-ig", "logit-diff"), ("llama", "eap-ig-activations", "kl"),
         ("qwen2", "eap", "logit-diff"), ("qwen2", "eap-ig", "log-prob"), ("qwen2", "eap-ig-activations", "logit-diff")]


@pytest.mark.parametrize("arch,method,metric", CASES)
def test_fused_scores_equal_slow_reference(arch, method, metric):
    hf = tiny_model(arch, dtype=torch.float64)
    model = EdgePrunedModel.from_hf(hf)
    batch = toy_batch(padded=arch == "gpt2")
    steps = 2 if method == "eap-ig-activations" else 3
    ours = attribute(model, ToyTask(), [batch], method=method, metric=metric, ig_steps=steps, progress=False)
    ref = ref_scores(hf, model.graph, batch, method, metric, steps)
    assert ours.dtype == torch.float64 and ours.shape == (model.graph.n_edges,)
    assert float(ref.abs().max()) > 1e-3  # the comparison means something
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,opts", [("gpt2", dict(split_embeds=True)), ("llama", dict(kv_per_query_head=True))])
def test_other_graphs_equal_slow_reference(arch, opts):
    hf = tiny_model(arch, dtype=torch.float64)
    model = EdgePrunedModel.from_hf(hf, **opts)
    batch = toy_batch(padded=False)
    ours = attribute(model, ToyTask(), [batch], method="eap-ig", metric="logit-diff", ig_steps=2, progress=False)
    ref = ref_scores(hf, model.graph, batch, "eap-ig", "logit-diff", 2, **opts)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_checkpoint_layers_and_batches():
    """Per-layer checkpointing gives the same scores; two batches average by example."""
    hf = tiny_model("llama", dtype=torch.float64)
    b1, b2 = toy_batch(B=2, seed=3, padded=False), toy_batch(B=3, seed=4, padded=False)
    plain = EdgePrunedModel.from_hf(hf)
    s1 = attribute(plain, ToyTask(), [b1], method="eap-ig", ig_steps=2, progress=False)
    s2 = attribute(plain, ToyTask(), [b2], method="eap-ig", ig_steps=2, progress=False)
    both = attribute(plain, ToyTask(), [b1, b2], method="eap-ig", ig_steps=2, progress=False)
    torch.testing.assert_close(both, (2 * s1 + 3 * s2) / 5, atol=1e-12, rtol=0)
    ck = EdgePrunedModel.from_hf(hf, checkpoint_layers=True)
    torch.testing.assert_close(attribute(ck, ToyTask(), [b1, b2], method="eap-ig", ig_steps=2, progress=False),
                               both, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["eap", "eap-ig-activations"])
def test_checkpoint_layers_every_method(method):
    hf = tiny_model("gpt2", dtype=torch.float64)
    batch = toy_batch()
    plain = attribute(EdgePrunedModel.from_hf(hf), ToyTask(), [batch], method=method, ig_steps=2, progress=False)
    ck = attribute(EdgePrunedModel.from_hf(hf, checkpoint_layers=True), ToyTask(), [batch], method=method,
                   ig_steps=2, progress=False)
    torch.testing.assert_close(ck, plain, atol=1e-12, rtol=0)


def test_float32_close_to_float64_and_masks_untouched():
    hf = tiny_model("gpt2", dtype=torch.float64)
    m64 = EdgePrunedModel.from_hf(hf)
    before = m64.edge_scores().clone()
    batch = toy_batch()
    s64 = attribute(m64, ToyTask(), [batch], method="eap", progress=False)
    assert torch.equal(m64.edge_scores(), before) and m64.masks.circuit is None and m64.probe is None
    m32 = EdgePrunedModel.from_hf(tiny_model("gpt2", dtype=torch.float32))
    s32 = attribute(m32, ToyTask(), [batch], method="eap", progress=False)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, atol=1e-4 * float(s64.abs().max()), rtol=0)


def test_eap_kl_refused_and_default_metric():
    with pytest.raises(ValueError, match="gradient there .* is exactly 0"):
        check_method_metric("eap", "kl", ToyTask())
    with pytest.raises(ValueError, match="contrasting answer"):
        check_method_metric("eap-ig", "logit-diff", NoContrast())
    with pytest.raises(ValueError, match="method: expected one of"):
        check_method_metric("ig", "kl", ToyTask())
    assert default_metric(ToyTask()) == "logit-diff" and default_metric(NoContrast()) == "log-prob"


def test_eap_resid_post_scores_are_a_directional_derivative():
    """An independent check of EAP on the last reader: its scores sum to the derivative of M
    when resid_post's input moves along sum_w delta_w (finite difference on the HF modules)."""
    hf = tiny_model("gpt2", dtype=torch.float64)
    model = EdgePrunedModel.from_hf(hf)
    batch = toy_batch(padded=False)
    s = attribute(model, ToyTask(), [batch], method="eap", metric="logit-diff", progress=False)
    g = model.graph.groups[-1]
    total = float(s[g.offset:g.offset + g.n_edges].sum())
    clean, corr = model.reference(batch.input_ids)[1], model.reference(batch.corrupted_input_ids)[1]
    x, d = clean.sum(0), (clean - corr).sum(0)
    t = 1e-6
    with torch.no_grad():
        m = [ref_metric("logit-diff", hf.lm_head(hf.transformer.ln_f(x + u * d)), None, batch) for u in (-t, t)]
    assert abs(total) > 1e-3
    assert abs(float(m[1] - m[0]) / (2 * t) - total) < 1e-6 * max(1.0, abs(total))


def test_bfloat16_close_to_float32():
    """bf16 weights and states (delta in bf16, the mix backward accumulating in float32)."""
    batch = toy_batch()
    s32 = attribute(EdgePrunedModel.from_hf(tiny_model("llama")), ToyTask(), [batch], method="eap-ig", ig_steps=2,
                    progress=False)
    s16 = attribute(EdgePrunedModel.from_hf(tiny_model("llama", dtype=torch.bfloat16)), ToyTask(), [batch],
                    method="eap-ig", ig_steps=2, progress=False)
    assert s16.dtype == torch.float32 and bool(torch.isfinite(s16).all())
    cos = float(torch.nn.functional.cosine_similarity(s16, s32, dim=0))
    assert cos > 0.99, cos
