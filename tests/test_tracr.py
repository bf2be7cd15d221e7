"""Tracr loader, model and per-edge reference against the exported examples and ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeprune_fast.tracr import (
    TRACR_DATA_DIR,
    load_examples,
    load_ground_truth,
    load_tracr,
    resolve_tracr_path,
)

GT_SETS = ["edge_pruning_reverse_t3_s3", "acdc_reverse_6_permutations"]  # the length-3 sets


@pytest.fixture(scope="module")
def model():
    return load_tracr(TRACR_DATA_DIR, "reverse")


@pytest.fixture(scope="module")
def examples():
    return load_examples(TRACR_DATA_DIR, "reverse")


@pytest.fixture(scope="module")
def gt():
    return load_ground_truth(TRACR_DATA_DIR / "reverse")


def test_path_forms_resolve_the_same_model():
    want = (TRACR_DATA_DIR, "reverse")
    assert resolve_tracr_path(TRACR_DATA_DIR, "reverse") == want
    assert resolve_tracr_path(TRACR_DATA_DIR / "reverse.config.json") == want
    assert resolve_tracr_path(str(TRACR_DATA_DIR / "reverse")) == want
    with pytest.raises(ValueError, match="path: expected a directory"):
        resolve_tracr_path(TRACR_DATA_DIR / "nope")


def test_weights_are_frozen_and_named_like_the_export(model):
    params = dict(model.named_parameters())
    assert set(params) == set(model.config.expected_shapes())
    assert not any(p.requires_grad for p in params.values())
    assert model.blocks[3].attn.W_Q.shape == (1, 41, 12) and model.blocks[3].attn.W_O[0].shape == (12, 41)


@pytest.mark.parametrize("corrupted", [False, True], ids=["clean", "corrupted"])
def test_reproduces_every_example_set(model, examples, corrupted):
    assert set(examples) == {*GT_SETS, "reverse_len5_random32"}
    for s in examples.values():
        ids = s.corrupted_input_ids if corrupted else s.input_ids
        want_ids = s.corrupted_expected_output_ids if corrupted else s.expected_output_ids
        want_tokens = s.corrupted_expected_output if corrupted else s.expected_output
        out = model(ids)
        assert torch.equal(out.argmax(-1)[:, 1:], want_ids[:, 1:]), s.name
        assert [r[1:] for r in model.decode(out)] == [r[1:] for r in want_tokens], s.name
        if not corrupted:  # the file rounds to 1e-6; tracr itself is ~1e-6 from one-hot
            torch.testing.assert_close(out[:, 1:], s.expected_output_dims_values[:, 1:], atol=1e-6, rtol=0)
        assert model.decode(out)[0][0] == "BOS"


def test_encode_matches_the_examples(model, examples):
    s = examples["acdc_reverse_6_permutations"]
    tokens = [e["tokens"] for e in s.raw["examples"]]
    assert torch.equal(model.encode(tokens), s.input_ids)
    assert torch.equal(model.encode([t[1:] for t in tokens]), s.input_ids)  # BOS prepended
    assert torch.equal(model.encode(tokens[0]), s.input_ids[:1])
    with pytest.raises(ValueError, match="tokens: \\[4\\] not in the vocabulary"):
        model.encode([1, 4])
    with pytest.raises(ValueError, match="n_ctx=6"):
        model.encode([1, 2, 3, 1, 2, 3])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[3, 0, 7]]))


def test_full_graph_size(model, gt):
    full, split = model.full_graph_edges(), model.full_graph_edges(split_embeds=True)
    assert (len(full), len(split)) == (77, 94) == (gt.n_edges_full, gt.n_edges_full_split_embeds)
    assert len(set(full)) == 77 and len(set(split)) == 94
    assert ("a0.h0", "m0") in full and ("a0.h0", "a0.h0.q") not in full and ("m0", "a1.h0.k") in full
    assert set(gt.edges) <= set(full) and set(gt.edges_split_embeds) <= set(split)
    assert len(gt.edges) == 10 and len(gt.edges_split_embeds) == 11


@pytest.mark.parametrize("split", [False, True], ids=["embeds", "split_embeds"])
def test_reference_with_every_edge_is_the_model(model, examples, split):
    ids = examples["reverse_len5_random32"].input_ids
    out, writers = model.run_with_writers(ids, split_embeds=split)
    torch.testing.assert_close(out, model(ids), atol=1e-6, rtol=0)
    assert list(writers) == model.writers(split)
    resid = sum(writers.values())  # the writers sum to the residual stream
    torch.testing.assert_close(model.unembed(resid), model(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("split", [False, True], ids=["embeds", "split_embeds"])
@pytest.mark.parametrize("set_name", GT_SETS)
def test_ground_truth_circuit_under_zero_ablation(model, examples, gt, split, set_name):
    s = examples[set_name]
    assert s.use_for_ground_truth_test
    edges = gt.edges_split_embeds if split else gt.edges
    full = model(s.input_ids)
    kept = model.forward_with_circuit(s.input_ids, set(edges), split_embeds=split)
    assert torch.equal(kept.argmax(-1)[:, 1:], full.argmax(-1)[:, 1:])
    torch.testing.assert_close(kept[:, 1:], full[:, 1:], atol=2e-6, rtol=0)
    for edge in edges:  # every edge is necessary
        pruned = model.forward_with_circuit(s.input_ids, set(edges) - {edge}, split_embeds=split)
        assert not torch.equal(pruned.argmax(-1)[:, 1:], full.argmax(-1)[:, 1:]), edge


def test_resample_alternative_with_corrupted_writers(model, examples, gt):
    s = examples["edge_pruning_reverse_t3_s3"]
    _, corrupted = model.run_with_writers(s.corrupted_input_ids)
    edges = gt.alternatives["resample_ablation_miller_et_al"]
    out = model.forward_with_circuit(s.input_ids, edges, ablated=corrupted)
    assert torch.equal(out.argmax(-1)[:, 1:], model(s.input_ids).argmax(-1)[:, 1:])
    out = model.forward_with_circuit(s.input_ids, edges[:1], ablated=corrupted)
    assert not torch.equal(out.argmax(-1)[:, 1:], model(s.input_ids).argmax(-1)[:, 1:])


def test_unknown_edges_and_writers_are_rejected(model, examples):
    ids = examples["acdc_reverse_6_permutations"].input_ids
    with pytest.raises(ValueError, match="kept_edges: 1 edges not in the graph.*a0.h0.q"):
        model.forward_with_circuit(ids, {("a0.h0", "a0.h0.q")})
    with pytest.raises(ValueError, match="kept_edges.*tok_embeds"):
        model.forward_with_circuit(ids, {("tok_embeds", "m0")})  # split writer without split_embeds
    with pytest.raises(ValueError, match="ablated: .*missing"):
        model.forward_with_circuit(ids, set(), ablated={})


# ---- broken exports ----------------------------------------------------------------------
def _copy(tmp_path: Path) -> Path:
    for suffix in ("config.json", "safetensors"):
        shutil.copy(TRACR_DATA_DIR / f"reverse.{suffix}", tmp_path / f"reverse.{suffix}")
    return tmp_path / "reverse"


def _edit_weights(prefix: Path, edit) -> None:
    arrays = load_file(f"{prefix}.safetensors")
    edit(arrays)
    save_file(arrays, f"{prefix}.safetensors")


def _edit_config(prefix: Path, edit) -> None:
    path = Path(f"{prefix}.config.json")
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_missing_array(tmp_path):
    prefix = _copy(tmp_path)
    _edit_weights(prefix, lambda a: a.pop("blocks.2.mlp.W_in"))
    with pytest.raises(ValueError, match=r"'blocks.2.mlp.W_in': expected shape \[41, 30\] float32, got nothing"):
        load_tracr(prefix)


def test_misshaped_array(tmp_path):
    prefix = _copy(tmp_path)
    _edit_weights(prefix, lambda a: a.update({"blocks.1.attn.W_K": torch.zeros(1, 41, 11)}))
    with pytest.raises(ValueError, match=r"'blocks.1.attn.W_K': expected shape \[1, 41, 12\] float32, got shape \[1, 41, 11\]"):
        load_tracr(prefix)


def test_unexpected_array(tmp_path):
    prefix = _copy(tmp_path)
    _edit_weights(prefix, lambda a: a.update({"blocks.4.mlp.W_in": torch.zeros(41, 30)}))
    with pytest.raises(ValueError, match=r"arrays not in the config: \['blocks.4.mlp.W_in'\]"):
        load_tracr(prefix)


@pytest.mark.parametrize(
    ("parts", "shown"),
    [
        (["architecture", "d_head"], "architecture.d_head"),
        (["input_encoding", "token_to_id"], "input_encoding.token_to_id"),
        (["output_decoding", "kind"], "output_decoding.kind"),
        (["arrays", "unembed.W_U"], "arrays.unembed.W_U.shape"),
    ],
)
def test_missing_config_key(tmp_path, parts, shown):
    prefix = _copy(tmp_path)

    def drop(cfg):
        for part in parts[:-1]:
            cfg = cfg[part]
        del cfg[parts[-1]]

    _edit_config(prefix, drop)
    with pytest.raises(ValueError, match=f"reverse.config.json: missing key '{shown}'"):
        load_tracr(prefix)


def test_config_disagreeing_with_the_architecture(tmp_path):
    prefix = _copy(tmp_path)
    _edit_config(prefix, lambda c: c["arrays"]["embed.W_pos"].update(shape=[7, 41]))
    with pytest.raises(ValueError, match=r"'arrays.embed.W_pos.shape' is \[7, 41\] but the architecture implies \[6, 41\]"):
        load_tracr(prefix)


def test_numerical_output_decoding(tmp_path):
    """A one-dimensional numerical output: decode gives the value of that dimension."""
    prefix = _copy(tmp_path)
    _edit_weights(prefix, lambda a: a.update({"unembed.W_U": a["unembed.W_U"][:, 1:2].contiguous()}))

    def numerical(c):
        c["architecture"]["d_out"] = 1
        c["arrays"]["unembed.W_U"]["shape"] = [41, 1]
        c["output_decoding"] = {"kind": "numerical", "output_dims": [1]}

    _edit_config(prefix, numerical)
    m = load_tracr(prefix)
    out = m(m.encode([2, 1, 1]))
    assert out.shape == (1, 4, 1)
    decoded = m.decode(out)[0]
    assert decoded[0] == "BOS" and decoded[1] == pytest.approx(0.0, abs=1e-5)  # reverse = 1, 1, 2
    assert decoded[3] == pytest.approx(1.0, abs=1e-5)
