"""Compile the tracr program suite and export each model in the shared tracr format.

Runs in the optional jax environment (``make tracr-compile`` creates ``.venv-tracr`` with
``tracr-pypi``, jax and dm-haiku); the package itself never needs jax. For each program of
:data:`PROGRAMS` it writes, into ``--out`` (default ``edgeprune_fast/data/tracr``):

    <name>.config.json    architecture, residual-stream labels, input encoding, output
                          decoding, every array's shape and tracr source (the format of
                          ../shared/tracr/README.md)
    <name>.safetensors    the float32 arrays (tracr's parameters, reshaped per head)
    <name>.examples.json  example sets: inputs, tracr's outputs on them, corrupted inputs

The ground truth (``<name>.ground_truth.json``) is derived afterwards from these files by
``python -m edgeprune_fast.tracr_truth`` (torch only), from the weights' dependency graph.

Expected outputs are the compiled model's own (tracr's forward, batched); each set also
records whether they agree with the RASP evaluator (``rasp.evaluate``). ``reverse`` is not
compiled here: the shipped ``reverse`` is the Edge Pruning / ACDC model from the shared
export (bitwise their weights). ``make_frac_prevs`` is never compiled on its own (it is
kept aside as an independent check); note that tracr's ``make_pair_balance`` and
``make_shuffle_dyck`` call it internally for their running fractions, so both contain its
numerical-aggregate machinery.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

BOS, PAD = "BOS", "compiler_pad"
FORMAT_VERSION = 1
GT_LENGTHS = (2, 3, 4)  # every sequence of these lengths: the ground-truth / training sets
HELD_OUT = 32  # random sequences of the maximum length, a set not used for the ground truth


@dataclass(frozen=True)
class Program:
    make: Callable[[], rasp.SOp]
    vocab: tuple
    max_seq_len: int
    rasp: str
    task: str
    unique: bool = False  # inputs must have distinct tokens (sort)


PROGRAMS: dict[str, Program] = {
    "sort": Program(lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens), (1, 2, 3, 4, 5), 5,
                    "smaller = Select(tokens, tokens, LT); target_pos = SelectorWidth(smaller); "
                    "sort = Aggregate(Select(target_pos, indices, EQ), tokens)  (lib.make_sort_unique)",
                    "output position i = the i-th smallest input token (distinct tokens)", unique=True),
    "hist": Program(lib.make_hist, ("a", "b", "c"), 5,
                    "hist = SelectorWidth(Select(tokens, tokens, EQ))  (lib.make_hist)",
                    "output position i = how many times token i occurs in the input"),
    "pair_balance": Program(lambda: lib.make_pair_balance(rasp.tokens, "(", ")"), ("(", ")", "x"), 5,
                            "opens = frac_prevs(tokens == '('); closes = frac_prevs(tokens == ')'); "
                            "pair_balance = opens - closes  (lib.make_pair_balance; numerical; frac_prevs is "
                            "numerical Aggregate(Select(indices, indices, LEQ), bools) inside it)",
                            "output position i = fraction of '(' minus fraction of ')' among positions <= i "
                            "(numerical)"),
    "length": Program(lib.make_length, (1, 2, 3), 5,
                      "length = SelectorWidth(Select(tokens, tokens, TRUE))  (lib.make_length)",
                      "every output position = the input length"),
    "shuffle_dyck": Program(lambda: lib.make_shuffle_dyck(["()", "{}"]), ("(", ")", "{", "}"), 5,
                            "balance_p = pair_balance(tokens, p) for p in '()', '{}'; any_negative = OR_p "
                            "balance_p < 0; has_neg = numerical mean over all positions of any_negative; "
                            "last_zero = Aggregate(Select(indices, length - 1, EQ), AND_p balance_p == 0); "
                            "shuffle_dyck = last_zero AND NOT has_neg  (lib.make_shuffle_dyck(['()', '{}']))",
                            "every output position = 1 if both bracket types are balanced (shuffle-Dyck-2), "
                            "else 0"),
}


def _plain(v):
    """A token or output value as JSON: numpy scalars to Python, integral floats kept as floats."""
    return v.item() if hasattr(v, "item") else v


def _sequences(prog: Program, length: int) -> list[tuple]:
    if prog.unique:
        return list(itertools.permutations(prog.vocab, length))
    return list(itertools.product(prog.vocab, repeat=length))


def _corrupt(prog: Program, seq: tuple, rng: random.Random) -> tuple:
    """Each token replaced by a uniformly random different one (Edge Pruning's recipe);
    with distinct tokens (sort): a different arrangement of distinct tokens."""
    if prog.unique:
        while True:
            out = tuple(rng.sample(prog.vocab, len(seq)))
            if out != seq:
                return out
    return tuple(rng.choice([t for t in prog.vocab if t != x]) for x in seq)


def _arrays(model, n_layers: int) -> dict[str, np.ndarray]:
    p = {k: {n: np.asarray(a, dtype=np.float32) for n, a in v.items()} for k, v in model.params.items()}
    cfg = model.model_config
    H, dh = cfg.num_heads, cfg.key_size
    out = {"embed.W_tok": p["token_embed"]["embeddings"], "embed.W_pos": p["pos_embed"]["embeddings"]}
    for layer in range(n_layers):
        a, m = f"transformer/layer_{layer}/attn/", f"transformer/layer_{layer}/mlp/"
        pre = f"blocks.{layer}."
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = p[a + theirs]["w"]
            out[pre + f"attn.W_{ours}"] = w.reshape(w.shape[0], H, dh).transpose(1, 0, 2)
            out[pre + f"attn.b_{ours}"] = p[a + theirs]["b"].reshape(H, dh)
        out[pre + "attn.W_O"] = p[a + "linear"]["w"].reshape(H, dh, -1)
        out[pre + "attn.b_O"] = p[a + "linear"]["b"]
        out[pre + "mlp.W_in"], out[pre + "mlp.b_in"] = p[m + "linear_1"]["w"], p[m + "linear_1"]["b"]
        out[pre + "mlp.W_out"], out[pre + "mlp.b_out"] = p[m + "linear_2"]["w"], p[m + "linear_2"]["b"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _source(key: str) -> str:
    if key.startswith("embed."):
        return {"embed.W_tok": "token_embed/embeddings (one-hot on tokens:<tok>, plus 1.0 on 'one')",
                "embed.W_pos": "pos_embed/embeddings (row 0, the BOS position, all zero)"}[key]
    if key == "unembed.W_U":
        return ("not a tracr parameter: tracr projects the final residual onto the output SOp's subspace "
                "(vectorspace_fns.project); this is that projection as a matrix")
    _, layer, kind, name = key.split(".")
    if kind == "attn":
        theirs = {"Q": "query", "K": "key", "V": "value", "O": "linear"}[name[-1]]
        return f"transformer/layer_{layer}/attn/{theirs}/{name[0].lower()} (per head: reshape(D, H, d_head))"
    return f"transformer/layer_{layer}/mlp/{'linear_1' if name.endswith('in') else 'linear_2'}/{name[0].lower()}"


def compile_one(name: str, prog: Program, out: Path, seed: int = 0) -> None:
    program = prog.make()
    model = compiling.compile_rasp_to_model(program, vocab=set(prog.vocab), max_seq_len=prog.max_seq_len,
                                            compiler_bos=BOS, compiler_pad=PAD, mlp_exactness=100)
    labels = list(model.residual_labels)
    D = len(labels)
    n_layers = model.model_config.num_layers
    arrays = _arrays(model, n_layers)
    categorical = rasp.is_categorical(program)
    out_name = program.label
    if categorical:
        enc = model.output_encoder.encoding_map  # value -> id
        id_to_token = sorted(((i, _plain(v)) for v, i in enc.items()))
        output_dims = [labels.index(f"{out_name}:{v}") for _, v in id_to_token]
    else:
        id_to_token = []
        output_dims = [labels.index(out_name)]
    W_U = np.zeros((D, len(output_dims)), dtype=np.float32)
    W_U[output_dims, range(len(output_dims))] = 1.0
    arrays["unembed.W_U"] = W_U
    token_to_id = sorted(((_plain(t), i) for t, i in model.input_encoder.encoding_map.items()), key=lambda x: x[1])
    tok_id = dict(token_to_id)
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab.split(":", 1)[0], []).append(i)

    # ---- examples: tracr's own outputs, batched per length ----
    rng = random.Random(seed)

    def run(seqs: Sequence[tuple]) -> tuple[list, np.ndarray]:
        ids = np.array([[tok_id[BOS], *(tok_id[t] for t in s)] for s in seqs])
        o = model.forward(model.params, ids)
        values = np.asarray(o.transformer_output.output) @ W_U  # [B, T, d_out]
        if categorical:
            decoded = [[BOS, *(id_to_token[j][1] for j in row[1:])] for row in values.argmax(-1).tolist()]
        else:
            decoded = [[BOS, *(float(x) for x in row[1:, 0])] for row in values]
        return decoded, values

    def rasp_out(seq: tuple) -> list:
        return [BOS, *(_plain(v) for v in rasp.evaluate(program, list(seq)))]

    def make_set(set_name: str, seqs: list[tuple], description: str, for_gt: bool) -> dict:
        corrupted = [_corrupt(prog, s, rng) for s in seqs]
        dec, vals = run(seqs)
        cdec, _ = run(corrupted)
        agree = 0
        examples = []
        for s, c, d, v, cd in zip(seqs, corrupted, dec, vals, cdec):
            want = rasp_out(s)
            ok = (d[1:] == want[1:]) if categorical else bool(np.allclose(d[1:], want[1:], atol=1e-3))
            agree += ok
            e = {"tokens": [BOS, *s], "input_ids": [tok_id[BOS], *(tok_id[t] for t in s)], "expected_output": d,
                 "rasp_output": want, "expected_output_dims_values": np.round(v, 6).tolist(),
                 "corrupted_tokens": [BOS, *c], "corrupted_input_ids": [tok_id[BOS], *(tok_id[t] for t in c)],
                 "corrupted_expected_output": cd}
            if categorical:
                inv = {t: i for i, t in id_to_token}
                e["expected_output_ids"] = [0, *(inv[t] for t in d[1:])]
                e["corrupted_expected_output_ids"] = [0, *(inv[t] for t in cd[1:])]
            examples.append(e)
        return {"name": set_name, "description": description, "n_examples": len(seqs),
                "seq_len_including_bos_position": len(seqs[0]) + 1,
                "compiled_agrees_with_rasp": f"{agree}/{len(seqs)}",
                "ground_truth_check": {"use_for_ground_truth_test": for_gt, "metric_positions": "1:"},
                "examples": examples}

    kind = "distinct tokens (all arrangements)" if prog.unique else "all sequences"
    sets = [make_set(f"{name}_all_len{n}", _sequences(prog, n), f"{kind} of length {n} over {list(prog.vocab)}, BOS "
                     "prepended; corrupted input: each token replaced by a random different one (seeded)", True)
            for n in GT_LENGTHS]
    pool = _sequences(prog, prog.max_seq_len)
    held = rng.sample(pool, min(HELD_OUT, len(pool)))
    sets.append(make_set(f"{name}_len{prog.max_seq_len}_random{len(held)}", held,
                         f"{len(held)} distinct random sequences of the maximum length {prog.max_seq_len}; not "
                         "used for the ground truth or for training", False))

    heads = model.model_config.num_heads
    config = {
        "name": name, "format_version": FORMAT_VERSION,
        "program": {"rasp": prog.rasp, "task": prog.task, "output_sop": out_name,
                    "output_kind": "categorical" if categorical else "numerical"},
        "compile_settings": {"vocab": [_plain(v) for v in prog.vocab], "max_seq_len": prog.max_seq_len,
                             "compiler_bos": BOS, "compiler_pad": PAD, "causal": False, "mlp_exactness": 100,
                             "compiler": "tracr-pypi 1.0.0 (compiling.compile_rasp_to_model), tools/compile_tracr.py"},
        "architecture": {
            "n_layers": n_layers, "n_heads": heads, "n_heads_per_layer": [heads] * n_layers, "d_model": D,
            "d_head": model.model_config.key_size, "d_head_value": model.model_config.key_size,
            "d_mlp": model.model_config.mlp_hidden_size, "n_ctx": prog.max_seq_len + 1,
            "d_vocab": len(token_to_id), "d_out": len(output_dims), "layernorm": False, "final_layernorm": False,
            "mlp_activation": "relu", "mlp_bias": True, "attn_bias": True,
            "all_biases_are_zero": all(not arrays[k].any() for k in arrays if ".b_" in k),
            "block": "sequential residual blocks: x = x + Attn(x); then x = x + MLP(x)",
            "attention": {"kind": "bidirectional softmax attention, no mask",
                          "scale": 1 / float(np.sqrt(model.model_config.key_size)),
                          "note": "tracr bakes its softmax coldness into W_Q; heads and MLP units tracr "
                                  "does not use are all-zero (padding to the largest layer)"}},
        "residual_stream": {"labels": labels, "groups": groups},
        "input_encoding": {"token_to_id": [list(x) for x in token_to_id], "bos_token": BOS, "bos_id": tok_id[BOS],
                           "pad_token": PAD, "pad_id": tok_id[PAD], "pad_is_masked": False,
                           "sequence_format": "[BOS, t_1, ..., t_n], n <= max_seq_len",
                           "embedding": "x_0[p] = W_tok[input_id[p]] + W_pos[p]"},
        "output_decoding": ({"kind": "categorical", "output_dims": output_dims,
                             "output_labels": [labels[i] for i in output_dims],
                             "id_to_token": [list(x) for x in id_to_token]} if categorical else
                            {"kind": "numerical", "output_dims": output_dims,
                             "output_labels": [labels[i] for i in output_dims]}),
        "files": {"weights_safetensors": f"{name}.safetensors", "ground_truth": f"{name}.ground_truth.json",
                  "examples": f"{name}.examples.json"},
        "arrays": {k: {"shape": list(v.shape), "dtype": "float32", "tracr_source": _source(k)}
                   for k, v in arrays.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out / f"{name}.safetensors"))
    (out / f"{name}.config.json").write_text(json.dumps(config, indent=1) + "\n")
    note = ("Inputs are given both as tokens and as input_ids. expected_* fields were produced by tracr's compiled "
            "model (its forward, batched); rasp_output is the RASP evaluator's. All sequences within one set have "
            "equal length.")
    (out / f"{name}.examples.json").write_text(json.dumps({"model": name, "note": note, "sets": sets}) + "\n")
    print(f"{name}: {n_layers} layers x {heads} heads, d_model {D}, d_mlp {model.model_config.mlp_hidden_size}; "
          + ", ".join(f"{s['name']} ({s['n_examples']}, agrees with RASP {s['compiled_agrees_with_rasp']})"
                      for s in sets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "edgeprune_fast" / "data"
                    / "tracr")
    ap.add_argument("programs", nargs="*", default=list(PROGRAMS), help=f"default: all of {list(PROGRAMS)}")
    args = ap.parse_args()
    for name in args.programs:
        if name not in PROGRAMS:
            raise SystemExit(f"programs: expected names from {list(PROGRAMS)}, got {name!r}")
        compile_one(name, PROGRAMS[name], args.out)


if __name__ == "__main__":
    main()
