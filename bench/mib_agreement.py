"""`edgeprune mib evaluate` against MIB's own evaluation, on tiny random models; and their speed.

MIB's evaluation is hannamw/MIB-circuit-track ``MIB_circuit_track.evaluation.evaluate_area_under_curve``
with its pinned EAP-IG (hannamw/EAP-IG 7af394a, the submodule of MIB's repository) on
TransformerLens 2.9.1 and transformers 4.46.3 (MIB's environment.yml). Those need an
environment of their own (their transformers is older than ours), so this runs in two stages:

    .venv/bin/python -m bench.mib_agreement --reference-python .venv-ref/bin/python

- stage "reference" (that interpreter): builds tiny GPT-2, Qwen2 and Gemma-2 models (random
  weights, random biases; Qwen2 and Gemma-2 with grouped-query attention; Gemma-2 with its
  post-norms and softcaps, loaded into TransformerLens through its gemma-2-2b config with the
  tiny sizes, ``_tl_gemma2_config``; EAP-IG's one CUDA-only allocation on its post-norm path
  made on the CPU, ``_cpu_shim``) and saves them with the tests' tokenizer,
  writes a score file per model with EAP-IG's own ``Graph.to_json`` (random scores, signs mixed),
  copies MIB-schema data (tests/data/mib) as ``validation.jsonl`` folders, and runs MIB's
  evaluation for each case (patching and zero ablation; |score| and signed ranking), loading the
  models with TransformerLens' ``from_pretrained`` processing (fold_ln, center_writing_weights,
  center_unembed, fold_value_biases) and MIB's flags (split qkv input, attn result, mlp in,
  ungrouped GQA);
- stage "ours" (this environment): the same files through ``edgeprune_fast.mib`` under MIB's
  conventions (Gemma-2 with ``post_norm="reader"``, MIB's graph for post-norms; the same
  circuits in the default "writer" mode are recorded beside it as
  ``max_abs_diff_post_norm_writer``); compares every faithfulness, CPR and CMD, and times both.

Writes bench/results/mib_agreement.json (machine, versions, git revision, per case: MIB's and
our faithfulness per budget, CPR, CMD, the largest difference, seconds: each side's ranking,
budgets, prune and evaluation, the models already loaded; ours after one warm-up call).

MIB's environment, as built for the recorded results (torch and the rest come from .venv)::

    python3 -m venv .venv-ref
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > .venv-ref/lib/python3.11/site-packages/base.pth
    .venv-ref/bin/pip install "transformers==4.46.3" "datasets==3.1.0" einops fancy-einsum jaxtyping \
        "beartype<0.15" better-abc "typeguard>=4.2,<5" rich pandas wandb tabulate
    .venv-ref/bin/pip install --no-deps "transformer-lens==2.9.1" EAP-IG@7af394a MIB-circuit-track
    # (the last two from `git archive` of hannamw/EAP-IG 7af394a and hannamw/MIB-circuit-track HEAD)

tests/bench/test_mib_agreement.py runs the tiny cases when MIB_REFERENCE_PYTHON names that
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "mib"
CASES = [  # (name, model, task file, ablation, absolute, batch size)
    ("gpt2-ioi-patching-abs", "gpt2", "ioi", "patching", True, 2),
    ("gpt2-ioi-patching-signed", "gpt2", "ioi", "patching", False, 3),
    ("gpt2-ioi-zero-abs", "gpt2", "ioi", "zero", True, 2),
    ("gpt2-arith-patching-abs", "gpt2", "arithmetic_addition", "patching", True, 2),
    ("qwen2-ioi-patching-abs", "qwen2", "ioi", "patching", True, 2),
    ("qwen2-ioi-zero-abs", "qwen2", "ioi", "zero", True, 2),
    ("qwen2-mcqa-patching-signed", "qwen2", "mcqa", "patching", False, 2),
    ("gemma2-ioi-patching-abs", "gemma2", "ioi", "patching", True, 2),
    ("gemma2-ioi-zero-abs", "gemma2", "ioi", "zero", True, 2),
    ("gemma2-mcqa-patching-signed", "gemma2", "mcqa", "patching", False, 2),
    ("gemma2-ioi-zero-abs-float64", "gemma2", "ioi", "zero", True, 2),
    ("gpt2small-ioi-patching-abs", "gpt2small", "ioi", "patching", True, 5),  # GPT-2 small's shape: speed
]
# our post-norm mode per model (post_norm.py): MIB's graph for Gemma-2's post-attention norms is "reader"
POST_NORM = {"gemma2": "reader"}
# cases run in float64 on both sides (the rest: float32). Why: under zero ablation a reader whose
# every edge is removed gets, in EAP-IG, actual - sum(actual) over its writers: not 0 but float32
# rounding, which an RMSNorm scales up where no bias keeps inputs away from 0 (Gemma-2); ours is 0
FLOAT64 = {"gemma2-ioi-zero-abs-float64"}


# -- stage "reference" (MIB's environment) -----------------------------------------------------------------
def _tiny_models(work: Path, names) -> None:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "tests" / "tasks"))
    from _task_tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    configs = {  # n_ctx: TransformerLens 2.9 reads it from GPT-2 configs
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, n_ctx=64, **common)),
        "gpt2small": lambda: GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=128,
                                                        n_ctx=128, **common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                      hidden_size=32, intermediate_size=48, max_position_embeddings=64,
                                                      tie_word_embeddings=False, **common)),
        # softcaps small enough to bend the tiny scores and logits; the window covers every prompt
        # (TransformerLens 2.9.1 windows the odd layers, HF the even ones: the same only so)
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=3, num_attention_heads=4,
                                                         num_key_value_heads=2, hidden_size=32, head_dim=8,
                                                         intermediate_size=48, max_position_embeddings=64,
                                                         sliding_window=64, query_pre_attn_scalar=8,
                                                         attn_logit_softcapping=5.0, final_logit_softcapping=5.0,
                                                         **common)),
    }
    for name in sorted(names):
        model = configs[name]()
        torch.manual_seed(len(name))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
                if "norm" in pname or "ln_" in pname:
                    p.add_(1.0)
        model.eval().save_pretrained(work / name)
        tok.save_pretrained(work / name)


def _tl_model(path: Path, dtype=None):
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    # TransformerLens 2.9.1 picks Llama / Gemma by the name's text ("llama", "gemma" anywhere in it,
    # the folders above included): give it the path relative to here, which must not hold them
    path = Path(os.path.relpath(path))
    if any(w in str(path).lower() for w in ("llama", "gemma")) and path.name not in ("gemma2",):
        raise ValueError(f"--work: TransformerLens reads 'llama'/'gemma' in a model's path as its architecture; "
                         f"expected a work folder whose path relative to here has neither, got {str(path)!r}")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # HookedTransformer.from_pretrained without its hub-name lookup (the model is a local folder)
    if hf.config.model_type == "gemma2":
        cfg = _tl_gemma2_config(hf.config, dtype)
    else:
        cfg = loading.get_pretrained_model_config(str(path), hf_cfg=hf.config.to_dict(), fold_ln=True, device="cpu",
                                                  dtype=dtype)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf, dtype=dtype)
    model = HookedTransformer(cfg, tok, move_to_device=False)
    # as from_pretrained: no centred unembedding under a logit softcap (not invariant to a constant)
    center_unembed = not cfg.output_logits_soft_cap > 0.0
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=center_unembed,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    model.cfg.use_split_qkv_input = True  # MIB's run_evaluation.py
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    model.cfg.ungroup_grouped_query_attention = True
    return model


def _tl_gemma2_config(c, dtype):
    """TransformerLens 2.9.1 reads Gemma-2 configs by hub name only (convert_hf_model_config has
    the official dicts, no branch on an HF config): its gemma-2-2b dict (its flags: post-norms,
    softcaps, local attention, RMS, gated MLP) with the tiny model's sizes, through its own
    get_pretrained_model_config (fold_ln: RMSPre)."""
    import transformer_lens.loading_from_pretrained as loading

    official = loading.convert_hf_model_config

    def tiny(name, **kwargs):
        d = official("google/gemma-2-2b")
        d.update(d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
                 n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
                 d_vocab=c.vocab_size, n_key_value_heads=c.num_key_value_heads, window_size=c.sliding_window,
                 rotary_base=c.rope_theta, attn_scores_soft_cap=c.attn_logit_softcapping,
                 output_logits_soft_cap=c.final_logit_softcapping)
        assert c.query_pre_attn_scalar == c.head_dim  # TransformerLens 2.9.1 scales by d_head ** -0.5
        return d

    loading.convert_hf_model_config = tiny
    try:
        return loading.get_pretrained_model_config("google/gemma-2-2b", fold_ln=True, device="cpu", dtype=dtype)
    finally:
        loading.convert_hf_model_config = official


def _cpu_shim():
    """EAP-IG 7af394a's evaluate_graph allocates its attention-head mask for post-norm models
    (use_normalization_before_and_after) with device='cuda'; without CUDA that one allocation is
    made on the CPU (eap.evaluate sees a torch whose zeros maps device 'cuda' to 'cpu'), nothing
    else changes. Returns whether it applied."""
    import types

    import eap.evaluate as ev
    import torch

    if torch.cuda.is_available():
        return False
    shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    shim.zeros = lambda *a, device=None, **k: torch.zeros(*a, device="cpu" if device == "cuda" else device, **k)
    ev.torch = shim
    return True


def _empty_circuit_logits(model, graph_file: Path, dataset, batch_size) -> float:
    """max |logit| of EAP-IG's evaluate_graph on the empty circuit under zero ablation: 0 in exact
    arithmetic for a model without biases (every reader's input is 0); what it is shows the
    rounding left by its actual - sum(actual) construction (see FLOAT64)."""
    from eap.evaluate import evaluate_graph
    from eap.graph import Graph

    g = Graph.from_json(str(graph_file))
    g.in_graph[:] = False
    for key, node in g.nodes.items():
        if key != "logits":
            node.in_graph = False
    top = []

    def metric(logits, clean_logits, input_lengths, label):
        top.append(float(logits.abs().max()))
        return logits[:, -1, 0]

    evaluate_graph(model, g, dataset.to_dataloader(batch_size), metric, quiet=True, intervention="zero")
    return max(top)


def reference(work: Path, cases=CASES) -> None:
    import torch
    from eap.graph import Graph
    from MIB_circuit_track.dataset import HFEAPDataset
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from MIB_circuit_track.metrics import get_metric

    _tiny_models(work, {c[1] for c in cases})
    shimmed = _cpu_shim()
    for task in {c[2] for c in cases}:
        folder = work / "data" / task
        if task == "mcqa":  # MIB loads the config "4_answer_choices": the HF repository's layout, with its card
            (folder / "4_answer_choices").mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / "mcqa.jsonl", folder / "4_answer_choices" / "validation.jsonl")
            (folder / "README.md").write_text("---\nconfigs:\n- config_name: 4_answer_choices\n  data_files:\n"
                                              "  - split: validation\n    path: 4_answer_choices/validation.jsonl\n---\n")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / f"{task}.jsonl", folder / "validation.jsonl")
    models, results, scored = {}, {}, set()
    for name, model_name, task, ablation, absolute, batch_size in cases:
        dtype = torch.float64 if name in FLOAT64 else torch.float32
        if (model_name, dtype) not in models:
            models[model_name, dtype] = _tl_model(work / model_name, dtype)
        model = models[model_name, dtype]
        if model_name not in scored:  # one score file per model, whatever the dtype
            scored.add(model_name)
            g = Graph.from_model(model)
            gen = torch.Generator().manual_seed(1)
            g.scores[:] = torch.randn(g.scores.shape, generator=gen) * g.real_edge_mask  # signs mixed
            g.to_json(str(work / f"{model_name}.scores.json"))
        graph = Graph.from_json(str(work / f"{model_name}.scores.json"))
        mib_task = {"arithmetic_addition": "arithmetic_addition"}.get(task, task)
        dataset = HFEAPDataset(str(work / "data" / task), model.tokenizer, split="validation", task=mib_task,
                               model_name=model_name)
        metric = get_metric("logit_diff", mib_task, model.tokenizer, model)
        started = time.perf_counter()
        counts, area_under, area_from_1, average, faithfulness = evaluate_area_under_curve(
            model, graph, dataset.to_dataloader(batch_size), partial(metric, mean=False, loss=False),
            quiet=True, absolute=absolute, intervention=ablation)
        results[name] = {"seconds": time.perf_counter() - started, "faithfulness": faithfulness, "cpr": area_under,
                         "cmd": area_from_1, "average": average, "weighted_edge_counts": counts,
                         "n_examples": len(dataset), "n_edges": len(graph.edges)}
        if ablation == "zero" and model_name == "gemma2":  # no biases: the empty circuit's logits are exactly 0
            results[name]["empty_circuit_max_abs_logit"] = _empty_circuit_logits(model, work / f"{model_name}.scores.json",
                                                                                   dataset, batch_size)
    import hashlib
    import importlib.metadata as md

    import eap
    import MIB_circuit_track
    import transformers

    def sha(module, name):  # identifies the code that ran (compare with `git show <commit>:<path> | sha256sum`)
        folder = Path(next(iter(module.__path__)))  # a package, maybe without __init__.py (MIB_circuit_track)
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]

    def origin(dist):
        try:
            return json.loads(md.distribution(dist).read_text("direct_url.json") or "{}").get("url")
        except md.PackageNotFoundError:
            return None

    results["_cuda_zeros_on_cpu"] = shimmed
    results["_versions"] = {
        "transformer_lens": md.version("transformer_lens"), "transformers": transformers.__version__,
        "torch": torch.__version__, "eap": {"installed_from": origin("eap"), "graph.py": sha(eap, "graph.py"),
                                           "evaluate.py": sha(eap, "evaluate.py"), "utils.py": sha(eap, "utils.py")},
        "MIB_circuit_track": {"installed_from": origin("MIB_circuit_track"),
                              "evaluation.py": sha(MIB_circuit_track, "evaluation.py"),
                              "dataset.py": sha(MIB_circuit_track, "dataset.py")}}
    (work / "reference.json").write_text(json.dumps(results, indent=1))


# -- stage "ours" -------------------------------------------------------------------------------------------
def ours(work: Path, cases=CASES) -> dict:
    import torch
    from transformers import AutoTokenizer

    from edgeprune_fast.mib.evaluate import (
        budgets,
        curve_percents,
        evaluate_budgets,
        mib_zero_writers,
        order_from_file,
        summarise,
    )
    from edgeprune_fast.mib.tasks import load_mib_task
    from edgeprune_fast.model import EdgePrunedModel

    torch.set_num_threads(1)
    ref = json.loads((work / "reference.json").read_text())
    out = {}
    for name, model_name, task, ablation, absolute, batch_size in cases:
        path = work / model_name
        tok = AutoTokenizer.from_pretrained(path)
        mib_task = load_mib_task(work / "data" / task, tok)
        batches = mib_task.batches(batch_size, "validation")
        post_norm = POST_NORM.get(model_name, "writer")
        dtype = torch.float64 if name in FLOAT64 else torch.float32
        model = EdgePrunedModel.from_pretrained(path, ablation="corrupted", kv_per_query_head=True, post_norm=post_norm,
                                                dtype=dtype)
        if ablation == "zero":
            S = max(b.input_ids.shape[1] for b in batches)
            model = EdgePrunedModel.from_hf(model.hf, ablation="mean", mean_writers=mib_zero_writers(model, S),
                                            kv_per_query_head=True, post_norm=post_norm)
        d = json.loads((work / f"{model_name}.scores.json").read_text())
        if not out:  # warm up (first calls pick the backends); MIB's time also excludes loading its model
            evaluate_budgets(model, budgets(model.graph, torch.randperm(model.graph.n_edges), [1.0], pruned=False),
                             batches[:1], mib_task.metric)
        started = time.perf_counter()  # as MIB's: ranking, budgets, prune, evaluation
        order = order_from_file(d, model.graph, absolute=absolute)
        circuits = budgets(model.graph, order, curve_percents(), pruned=True)
        result = evaluate_budgets(model, circuits, batches, mib_task.metric)
        seconds = time.perf_counter() - started
        by_percent = {round(p["percent"], 10): p for p in result["points"]}
        fs = [by_percent[round(100 * f, 10)]["faithfulness"] for f in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                                                        0.2, 0.5, 1)]
        summary = summarise(result["points"])
        theirs = ref[name]
        diffs = [abs(a - b) for a, b in zip(fs, theirs["faithfulness"])]
        counts = [by_percent[round(100 * f, 10)]["n_edges_kept"] for f in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                                                                            0.1, 0.2, 0.5, 1)]
        other = None
        if post_norm == "reader":  # the same circuits in our default mode: how far from MIB's that is
            writer = EdgePrunedModel.from_hf(model.hf, ablation=model.ablation, mean_writers=None if ablation != "zero"
                                             else mib_zero_writers(EdgePrunedModel.from_hf(model.hf, kv_per_query_head=True), S),
                                             kv_per_query_head=True)
            w_points = {round(p["percent"], 10): p for p in evaluate_budgets(writer, circuits, batches,
                                                                             mib_task.metric)["points"]}
            other = max(abs(w_points[round(100 * f, 10)]["faithfulness"] - b) for f, b in
                        zip((0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), theirs["faithfulness"]))
        extra = {k: theirs[k] for k in ("empty_circuit_max_abs_logit",) if k in theirs}
        out[name] = {
            **extra, "model": model_name, "task": task, "ablation": ablation, "absolute": absolute, "batch_size": batch_size,
            "dtype": str(dtype).removeprefix("torch."), "post_norm": post_norm, "max_abs_diff_post_norm_writer": other,
            "n_examples": result["n_examples"], "n_examples_mib": theirs["n_examples"], "n_edges": model.graph.n_edges,
            "n_edges_mib": theirs["n_edges"], "edges_kept": counts, "edges_kept_mib": theirs["weighted_edge_counts"],
            "faithfulness": fs, "faithfulness_mib": theirs["faithfulness"], "max_abs_diff": max(diffs),
            "cpr": summary["cpr"], "cpr_mib": theirs["cpr"], "cmd": summary["cmd"], "cmd_mib": theirs["cmd"],
            "seconds": seconds, "seconds_mib": theirs["seconds"], "speedup": theirs["seconds"] / seconds,
        }
        print(f"{name:30s} max |f - f_MIB| = {max(diffs):.2e}   CPR {summary['cpr']:.5f} vs {theirs['cpr']:.5f}   "
              f"CMD {summary['cmd']:.5f} vs {theirs['cmd']:.5f}   {seconds:.2f} s vs {theirs['seconds']:.2f} s")
    return {"cases": out, "reference_versions": ref["_versions"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["reference", "ours", "both"], default="both")
    p.add_argument("--reference-python", default=str(ROOT / ".venv-ref" / "bin" / "python"),
                   help="the interpreter of MIB's environment (transformer_lens, eap, MIB_circuit_track)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "mib_agreement")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mib_agreement.json")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = p.parse_args()
    cases = CASES if args.cases is None else [c for c in CASES if c[0] in args.cases.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "reference":
        reference(args.work, cases)
        return
    if args.stage == "both":
        cmd = [args.reference_python, __file__, "--stage", "reference", "--work", str(args.work)]
        subprocess.run(cmd + ([] if args.cases is None else ["--cases", args.cases]), check=True)
    from bench.common import machine

    result = {"machine": machine(), **ours(args.work, cases)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
