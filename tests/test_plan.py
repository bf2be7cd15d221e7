"""The memory planner: its prediction against the measured CPU peak of one step, the 13B
shape on one 80 GB GPU, the parameter count, bad input and the command-line entry."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from edgeprune_fast.plan import ModelShape, PlanSettings, add_arguments, layer_activations, plan, run
from tests.models._tiny import NEW_ARCHS, VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # as bench/common.py


def _measure(point: dict, backend: str = "reference") -> dict:
    """One step in a fresh process (bench/scale_bench.py --one): VmHWM above the start."""
    env = dict(os.environ, **MALLOC_ENV, EDGEPRUNE_BACKEND=backend, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "bench.scale_bench", "--threads", "1", "--one", json.dumps(point)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


POINTS = [  # Llama-shaped, GQA; (layers, heads, d_model, d_mlp, vocab, batch, seq, dtype, checkpointing)
    (8, 8, 256, 640, 4096, 4, 32, "float32", False),  # peak at the resid_post read's backward
    (4, 16, 512, 1344, 4096, 4, 32, "float32", True),  # one recomputed layer: the attention norm's backward
    pytest.param((4, 8, 256, 640, 32000, 4, 32, "float32", False), marks=pytest.mark.slow),  # the loss
    pytest.param((8, 8, 256, 640, 4096, 4, 32, "bfloat16", False), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"L{p[0]}-H{p[1]}-D{p[2]}-V{p[4]}-{p[7]}"
                         f"{'-ckpt' if p[8] else ''}")
def test_prediction_within_15_percent_of_measured_cpu_peak(point):
    L, H, D, F, V, B, S, dtype, ckpt = point
    row = _measure({"n_layers": L, "n_heads": H, "n_kv_heads": H // 2, "d_model": D, "d_mlp": F, "vocab": V,
                    "batch": B, "seq": S, "dtype": dtype, "checkpoint_layers": ckpt})
    print(f"measured {row['measured_bytes'] / 1e6:.1f} MB, predicted {row['predicted_step_bytes'] / 1e6:.1f} MB "
          f"({row['predicted_phase']}), ratio {row['ratio']:.3f}")
    assert row["edge_mix_backend"] == "reference"
    assert row["measured_bytes"] > 10e6  # large enough to measure
    assert 0.85 <= row["ratio"] <= 1.15


def test_uncached_references_free_the_corrupted_states_before_backward():
    """TrainConfig(cache_references=False): every backward phase is one corrupted-state tensor
    lower than cached, so the peak moves (here from the resid_post read's backward to the end
    of the forward), measured and predicted alike; checkpointed layers re-read the corrupted
    states, so there nothing changes."""
    point = {"n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "d_model": 256, "d_mlp": 640, "vocab": 4096,
             "batch": 4, "seq": 32, "dtype": "float32"}
    row = _measure({**point, "cache_references": False})
    print(f"measured {row['measured_bytes'] / 1e6:.1f} MB, predicted {row['predicted_step_bytes'] / 1e6:.1f} MB "
          f"({row['predicted_phase']}), ratio {row['ratio']:.3f}")
    assert 0.85 <= row["ratio"] <= 1.15
    shape = ModelShape(8, 8, 4, 256, 640, 4096)
    cached, uncached = (plan(shape, PlanSettings(4, 32, "float32", backend="reference", cache_references=c))
                        for c in (True, False))
    corrupted = shape.n_writers * 4 * 32 * 256 * 4
    assert cached.peak_phase == "backward of resid_post" and uncached.peak_phase == "forward end"
    assert uncached.peak_bytes < cached.peak_bytes
    assert all(cached.phases[k] - uncached.phases[k] == corrupted for k in cached.phases if k != "forward end")
    assert cached.phases["forward end"] == uncached.phases["forward end"]
    assert uncached.components["writer_states.corrupted"] == corrupted  # alive at the forward's end
    assert "references not cached" in uncached.table() and "not cached" not in cached.table()
    ckpt = [plan(shape, PlanSettings(4, 32, "float32", checkpoint_layers=True, cache_references=c)).peak_bytes
            for c in (True, False)]
    assert ckpt[0] == ckpt[1]


def test_kv_readers_per_query_head_planned_as_built(one_thread):
    """MIB's graph (k/v readers per query head): the planner's edge count is the graph's, its
    layer activations are the saved-tensor audit's, and its peak the measured step's."""
    from edgeprune_fast.model import EdgePrunedModel

    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    shape = ModelShape.from_hf_config(model.config, kv_per_query_head=True)
    grouped = ModelShape.from_hf_config(model.config)
    assert shape.n_edges == EdgePrunedModel.from_hf(model, kv_per_query_head=True).graph.n_edges > grouped.n_edges
    predicted = sum(layer_activations(shape, PlanSettings(2, 16, "float32")))
    assert predicted > sum(layer_activations(grouped, PlanSettings(2, 16, "float32")))
    for measured in _saved_per_layer("llama", "float32", 2, 16, kv_per_query_head=True):
        assert 0.9 <= measured / predicted <= 1.1, (measured, predicted)
    row = _measure({"n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "d_model": 256, "d_mlp": 640, "vocab": 4096,
                    "batch": 4, "seq": 32, "dtype": "float32", "kv_per_query_head": True})
    print(f"measured {row['measured_bytes'] / 1e6:.1f} MB, predicted {row['predicted_step_bytes'] / 1e6:.1f} MB "
          f"({row['predicted_phase']}), ratio {row['ratio']:.3f}")
    assert 0.85 <= row["ratio"] <= 1.15


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-activations"])
def test_attribution_fits_in_the_plan_of_a_step(method):
    """`edgeprune attribute` (MIB's graph, as the command builds it) needs no more than the
    planner's training step, within its 15 % (bench/scale_bench.py make_attribution)."""
    row = _measure({"n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "d_model": 256, "d_mlp": 640, "vocab": 4096,
                    "batch": 4, "seq": 32, "dtype": "float32", "kv_per_query_head": True, "attribute": method})
    print(f"{method}: measured {row['measured_bytes'] / 1e6:.1f} MB, predicted step {row['predicted_step_bytes'] / 1e6:.1f} "
          f"MB, ratio {row['ratio']:.3f}")
    assert 0.7 <= row["ratio"] <= 1.15


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
def test_prediction_for_the_fused_kernels(ckpt):
    """The C++ kernels add the writers' gradient into the slot buffer's (no [n, N, D] temporary)."""
    from edgeprune_fast import _native

    if _native.load() is None:
        pytest.skip(f"the C++ extension is not available: {_native.load_error()}")
    row = _measure({"n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "d_model": 256, "d_mlp": 640, "vocab": 4096,
                    "batch": 4, "seq": 32, "dtype": "float32", "checkpoint_layers": ckpt}, backend="cpp")
    assert row["edge_mix_backend"] == "cpp"
    assert 0.85 <= row["ratio"] <= 1.15


def test_13b_fits_one_80gb_gpu_in_bf16_with_checkpointing():
    cfg = LlamaConfig(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, hidden_size=5120,
                      intermediate_size=13824, vocab_size=32000)
    shape = ModelShape.from_hf_config(cfg)
    assert 12.8e9 < shape.params() < 13.1e9  # CodeLlama/Llama-2-13B: 13.0 B
    assert shape.params() == ModelShape(40, 40, 40, 5120, 13824, 32000).params()  # the formula agrees with HF
    p = plan(shape, PlanSettings(batch=1, seq=64, dtype="bfloat16", checkpoint_layers=True))
    print("\n" + p.table())
    assert p.fits and p.peak_bytes < 80e9
    groups = p.group_totals()
    assert groups["weights"] == shape.params() * 2
    assert groups["writer_states"] >= 3 * shape.n_writers * 64 * 5120 * 2  # buffer, its gradient, corrupted
    # what the options change, each in the expected direction
    plain = plan(shape, PlanSettings(batch=1, seq=64, dtype="bfloat16"))
    assert plain.peak_bytes > p.peak_bytes
    fp32 = plan(shape, PlanSettings(batch=1, seq=64, dtype="float32", checkpoint_layers=True))
    assert fp32.peak_bytes > 1.9 * p.peak_bytes
    offload = plan(shape, PlanSettings(batch=1, seq=64, dtype="bfloat16", checkpoint_layers=True,
                                       corrupted_on_cpu=True))
    assert offload.peak_bytes < p.peak_bytes and offload.host_bytes == shape.n_writers * 64 * 5120 * 2
    sharded = plan(shape, PlanSettings(batch=1, seq=64, dtype="bfloat16", checkpoint_layers=True, n_gpus=8))
    assert sharded.peak_bytes < p.peak_bytes - 20e9
    assert not plan(shape, PlanSettings(batch=512, seq=512, dtype="bfloat16", checkpoint_layers=True)).fits


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="ModelShape.n_kv_heads"):
        ModelShape(2, 4, 3, 32, 64, 100)
    with pytest.raises(ValueError, match="batch"):
        PlanSettings(batch=0, seq=8)
    with pytest.raises(ValueError, match="dtype"):
        PlanSettings(batch=1, seq=8, dtype="int8")
    with pytest.raises(ValueError, match="model: expected a model directory"):
        ModelShape.from_path("/nonexistent/model")


def test_run_prints_the_table_and_reads_a_saved_config(tmp_path, capsys):
    LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=128, vocab_size=100).save_pretrained(tmp_path)
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert run(ap.parse_args(["--model", str(tmp_path / "config.json"), "--batch", "2", "--seq", "8"])) == 0
    out = capsys.readouterr().out
    assert "2 layers, 4 heads (2 KV)" in out and "fits in 80 GB" in out
    assert run(ap.parse_args(["--layers", "40", "--heads", "40", "--d-model", "5120", "--d-mlp", "13824",
                              "--dtype", "float32", "--batch", "64", "--seq", "512", "--json"])) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


# hub id: (parameters, in billions as the model cards round them), layers, heads, KV heads, what the layers add
KNOWN = {
    "google/gemma-2-2b": (2.61, 26, 8, 4, dict(post_norms=True, attn_softcap=True)),
    "google/gemma-2-9b": (9.24, 42, 16, 8, dict(post_norms=True, attn_softcap=True)),
    "mistralai/Mistral-7B-v0.1": (7.24, 32, 32, 8, {}),
    "Qwen/Qwen3-8B": (8.19, 36, 32, 8, dict(qk_norm="head")),
    "microsoft/Phi-3-mini-4k-instruct": (3.82, 32, 32, 32, {}),
    "allenai/OLMo-2-1124-7B": (7.30, 32, 32, 32, dict(pre_norms=False, post_norms=True, qk_norm="heads")),
    "openai-community/gpt2": (0.12, 12, 12, 12, {}),
    "Qwen/Qwen2.5-0.5B": (0.49, 24, 14, 2, {}),
    "meta-llama/Llama-3.1-8B": (8.03, 32, 32, 8, {}),
}
MIB_EDGES = {"openai-community/gpt2": 32_491, "Qwen/Qwen2.5-0.5B": 179_749, "google/gemma-2-2b": 74_218,
             "meta-llama/Llama-3.1-8B": 1_592_881}  # MIB's counts (tests/test_mib.py)


@pytest.mark.parametrize("hub", KNOWN)
def test_known_models_by_name(hub):
    billions, L, H, K, flags = KNOWN[hub]
    shape = ModelShape.from_known(hub.split("/")[-1].upper())  # the id's last part, any case
    assert shape == ModelShape.from_known(hub) and shape.name == hub
    assert round(shape.params() / 1e9, 2) == billions
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads) == (L, H, K)
    defaults = dict(pre_norms=True, post_norms=False, qk_norm="none", attn_softcap=False)
    assert {k: getattr(shape, k) for k in defaults} == defaults | flags
    if hub in MIB_EDGES:
        assert ModelShape.from_known(hub, kv_per_query_head=True).n_edges == MIB_EDGES[hub]
    if hub == "Qwen/Qwen3-8B":  # its card: 8.2 B, 6.95 B without the (untied) embeddings
        assert round((shape.params() - 2 * shape.vocab * shape.d_model) / 1e9, 2) == 6.95


def test_plan_command_reads_known_names_and_refuses_unknown_ones(capsys):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert run(ap.parse_args(["--model", "gemma-2-2b", "--batch", "8", "--seq", "128"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("google/gemma-2-2b: 26 layers, 8 heads (4 KV), d_model 2304, d_mlp 9216, vocab 256000; "
                          "2.61 B parameters")
    for name in ("mistral-7b", "phi-3-mini", "olmo-2-7b", "qwen3-8b", "gemma-2-9b"):
        assert run(ap.parse_args(["--model", name, "--device-gb", "1000"])) == 0
    with pytest.raises(ValueError, match=r"model: expected a model directory with a config.json, a config.json, "
                                         r"or a known model \(gemma-2-2b, gemma-2-9b, .*\), got 'gemma-3-1b'"):
        run(ap.parse_args(["--model", "gemma-3-1b"]))


def _saved_per_layer(arch: str, dtype: str, B: int, S: int, kv_per_query_head: bool = False) -> list[int]:
    """Bytes autograd keeps in each layer of a training forward (its own tensors: not the
    weights, not the slot buffer), counted once per storage."""
    import torch

    from edgeprune_fast.model import EdgePrunedModel

    model = tiny_model(arch, dtype=getattr(torch, dtype))
    pruned = EdgePrunedModel.from_hf(model, init=1.0, init_std=1.0, kv_per_query_head=kv_per_query_head).train()
    pruned.adapter = dataclasses.replace(pruned.adapter, n_ctx=S)
    ids, cids = torch.randint(3, VOCAB, (B, S)), torch.randint(3, VOCAB, (B, S))
    corrupted = pruned.reference(cids)[1]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, layer = [], pruned._layer

    def counted(*args):
        seen, buffer = {}, args[1].buffer.untyped_storage().data_ptr()

        def pack(t):
            if (ptr := t.untyped_storage().data_ptr()) not in weights and ptr != buffer:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(*args)
        saved.append(sum(seen.values()))
        return out

    pruned._layer = counted
    pruned(ids, corrupted_writers=corrupted, training=True)
    return saved


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", *NEW_ARCHS])
def test_layer_activations_match_a_saved_tensor_audit(arch, dtype, one_thread):
    """What each family's layer keeps for backward (q/k norms, softcapped attention's scores,
    post-norm shares) as the planner counts it, against autograd's saved tensors."""
    B, S = 2, 16
    shape = ModelShape.from_hf_config(tiny_model(arch).config)
    predicted = sum(layer_activations(shape, PlanSettings(B, S, dtype)))
    for measured in _saved_per_layer(arch, dtype, B, S):
        assert 0.9 <= measured / predicted <= 1.1, (measured, predicted)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_plan_reads_each_supported_family_from_its_saved_config(arch, tmp_path):
    config = tiny_model(arch).config
    config.save_pretrained(tmp_path)
    shape = ModelShape.from_path(tmp_path)
    assert shape == dataclasses.replace(ModelShape.from_hf_config(config), name=shape.name)  # name: the folder
    assert (shape.n_layers, shape.n_heads, shape.d_model) == (2, 4, 32)
    assert shape.n_params == sum(p.numel() for p in tiny_model(arch).parameters())
