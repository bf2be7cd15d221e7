"""The parts of the GPU check (bench/gpu_check.sh runs each in a process of its own, under a
time limit, and bench/gpu_report.py gathers them into one JSON and one Markdown file).

    versions            versions, the GPU, `python -m edgeprune_fast.info`, pytest or its absence
    tests               the CUDA test subset, `pytest -m cuda`: the kernels against the reference in
                        float32 / bfloat16 / float16 with gradients, GPT-2 and Llama model-level
                        equivalence (tests/ops/test_triton_backend.py, tests/models/test_triton_models.py)
    ioi_step            one pruning step at the paper's IOI setting (GPT-2 small's shape, batch 32,
                        seq 64, bfloat16) for ours, the original algorithm (bench/original_baseline.py,
                        op for op) and the HF floor (3 forwards + 1 backward of the plain model), through
                        bench/step_bench.py, and a profile of one step of ours
    edge_mix_bandwidth  edge_mix's forward and backward kernels at reader groups of GPT-2 small and
                        Llama-3.1-8B: effective memory bandwidth (the op's compulsory bytes / time) as a
                        share of the GPU's peak, each output checked against the reference maths
    llama_8b            a Llama-3.1-8B-shaped model (its config.json values below, random weights): step
                        time and peak memory against the planner's prediction (edgeprune_fast/plan.py,
                        `edgeprune plan`), through bench/scale_bench.py

    python -m bench.gpu_check PART --mode gpu|cpu-smoke --out DIR [--budget SECONDS]   -> DIR/PART.json

``--mode cpu-smoke`` runs the same code on the CPU with tiny shapes, the ops forced onto the
Triton kernels under Triton's interpreter (the script sets TRITON_INTERPRET=1), so the whole
pipeline is known to work before a GPU is there; its figures mean nothing.

A part writes what it has measured as it goes (``Part.save``), so a part that fails or runs
out of time still leaves its finished measurements; the script records the error and goes on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent

# meta-llama/Llama-3.1-8B's config.json (8,030,261,248 parameters); no download: the values are
# written here, the weights are random
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
# the same structure (grouped-query attention 4:1, llama3 rope scaling), tiny, for the CPU smoke
TINY_LLAMA = {**LLAMA_3_1_8B, "hidden_size": 64, "intermediate_size": 160, "max_position_embeddings": 256,
              "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1, "vocab_size": 512,
              "bos_token_id": 0, "eos_token_id": 1,
              "rope_scaling": {**LLAMA_3_1_8B["rope_scaling"], "original_max_position_embeddings": 64}}
TINY_GPT2 = {"n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 64}

SETTINGS = {
    "gpu": {
        "device": "cuda", "backend": None,  # the automatic choice: Triton on CUDA tensors
        # the sm_90 ahead-of-time build test is for machines without a GPU; here the kernels really compile
        "tests": ["-m", "cuda", "-k", "not build_for_h100"],
        "ioi": {"layers": 12, "gpt2": {}, "batch": 32, "seq": 64, "dtype": "bfloat16", "reps": 10,
                "method_seconds": 10.0, "baseline_seconds": 20.0},
        # (batch, checkpoint_layers), the first the planner says fits is run; seq 64 as the IOI point
        "llama": {"config": LLAMA_3_1_8B, "candidates": [(8, False), (8, True), (1, True)], "seq": 64,
                  "dtype": "bfloat16", "reps": 3},
        "bandwidth": {"models": [("gpt2-small, IOI batch 32 x seq 64", "gpt2", {}, 32 * 64, True,
                                  ["bfloat16", "float16", "float32"]),
                                 ("llama-3.1-8b, batch 8 x seq 64", "llama", LLAMA_3_1_8B, 8 * 64, False,
                                  ["bfloat16", "float32"])],
                      "reps": 20},
    },
    "cpu-smoke": {
        "device": "cpu", "backend": "triton",  # the kernels, interpreted
        "tests": ["-m", "cuda", "-k", "test_mix_matches_reference or (test_full_and_random_circuits and gpt2)"],
        "ioi": {"layers": 2, "gpt2": TINY_GPT2, "batch": 2, "seq": 8, "dtype": "bfloat16", "reps": 1,
                "method_seconds": 1.0, "baseline_seconds": 1.0},
        "llama": {"config": TINY_LLAMA, "candidates": [(2, False), (2, True)], "seq": 8, "dtype": "bfloat16",
                  "reps": 1, "device_gb": 4.0},
        "bandwidth": {"models": [("tiny gpt2", "gpt2", TINY_GPT2 | {"n_layer": 2}, 8, True, ["bfloat16", "float32"]),
                                 ("tiny llama", "llama", TINY_LLAMA, 8, False, ["bfloat16"])],
                      "reps": 1},
    },
}

# Peak DRAM bandwidth by device name (NVIDIA's data sheets), TB/s; the first name found in
# torch.cuda.get_device_name() counts, so the more specific names come first
PEAK_BANDWIDTH_TBPS = [
    ("H200", 4.8, "H200 (HBM3e), 4.8 TB/s"),
    ("H100 NVL", 3.9, "H100 NVL (HBM3), 3.9 TB/s"),
    ("H100 PCIe", 2.0, "H100 PCIe (HBM2e), 2.0 TB/s"),
    ("H100", 3.35, "H100 SXM5 (HBM3), 3.35 TB/s"),
    ("A100-SXM4-80GB", 2.039, "A100 SXM4 80 GB (HBM2e), 2.039 TB/s"),
    ("A100 80GB PCIe", 1.935, "A100 PCIe 80 GB (HBM2e), 1.935 TB/s"),
    ("A100", 1.555, "A100 40 GB (HBM2), 1.555 TB/s"),
    ("L40S", 0.864, "L40S (GDDR6), 0.864 TB/s"),
    ("A10G", 0.6, "A10G (GDDR6), 0.6 TB/s"),
    ("L4", 0.3, "L4 (GDDR6), 0.3 TB/s"),
]


def peak_bandwidth(device_name: str | None) -> dict:
    for key, tbps, what in PEAK_BANDWIDTH_TBPS:
        if device_name and key in device_name:
            return {"device": device_name, "matched": key, "peak_TBps": tbps, "entry": what}
    return {"device": device_name, "matched": None, "peak_TBps": None,
            "entry": "no entry for this device in bench/gpu_check.py PEAK_BANDWIDTH_TBPS"}


class Part:
    """One part's results, written to DIR/NAME.json after every update."""

    def __init__(self, name: str, out: Path):
        self.path = out / f"{name}.json"
        self.data: dict = {}

    def save(self, **fields) -> None:
        self.data.update(fields)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)  # never a half-written file, whenever the time limit strikes


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pytest_version() -> str | None:
    try:
        import pytest
    except ImportError:
        return None
    return pytest.__version__


def part_versions(s: dict, part: Part, budget: float) -> None:
    from bench.common import machine
    from edgeprune_fast.info import collect
    from edgeprune_fast.ops.backends import triton as triton_backend

    info = machine()
    if info.get("git_revision") == "unknown" and os.environ.get("GPU_CHECK_REVISION"):
        info["git_revision"] = os.environ["GPU_CHECK_REVISION"] + " (given by GPU_CHECK_REVISION)"
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
               "sm_count": p.multi_processor_count, "count": torch.cuda.device_count()}
    probe = torch.zeros(2, 2, device=s["device"])
    part.save(machine=info, torch_cuda=torch.version.cuda, gpu=gpu, numpy=_version("numpy"),
              pytest=_pytest_version(), edgeprune_fast_from=str(Path(sys.modules["edgeprune_fast"].__file__).parent),
              triton_kernels_unavailable=triton_backend.BACKEND.unavailable("edge_mix", [probe]),
              environment={k: os.environ.get(k) for k in ("TRITON_INTERPRET", "EDGEPRUNE_BACKEND", "PYTHONPATH",
                                                          "CUDA_VISIBLE_DEVICES")},
              backends=collect()["backends"])
    out = subprocess.run([sys.executable, "-m", "edgeprune_fast.info"], capture_output=True, text=True,
                         timeout=max(5.0, budget - 10), cwd=ROOT)
    part.save(info_text=out.stdout + (f"\n[exit {out.returncode}] {out.stderr[-2000:]}" if out.returncode else ""))


def _junit(path: Path) -> dict | None:
    """Counts and the failures from pytest's --junitxml file (pytest's own, no plugin)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (el.get("message") or "")[:500], "text": (el.text or "")[-1500:]})
    return {**counts, "failed": failed}


def part_tests(s: dict, part: Part, budget: float) -> None:
    version = _pytest_version()
    if version is None:
        part.save(status="not run", pytest=None,
                  reason="pytest is not installed for this python; carry one: `make gpu-pytest` here writes "
                         ".gpu-pytest/ (pure-Python wheels), which bench/gpu_check.sh puts on PYTHONPATH")
        return
    xml = part.path.with_name("tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}",
           *s["tests"], "tests"]
    part.save(pytest=version, command=" ".join(cmd[1:]).replace(str(xml), "tests.xml"))
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(10.0, budget - 15))
        rc, stdout, timed_out = out.returncode, out.stdout + out.stderr, False
    except subprocess.TimeoutExpired as exc:
        rc, timed_out = None, True
        stdout = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    lines = stdout.splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln
                                                                                  or "error" in ln)), None)
    verdicts = [ln.split(" ")[1] for ln in lines if "::" in ln and len(ln.split(" ")) > 1
                and ln.split(" ")[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED")]
    result = _junit(xml) if not timed_out else None
    if result is None:  # killed before pytest wrote its report: count the verdict lines it printed
        result = {"tests": len(verdicts), **{k: verdicts.count(v) for k, v in (
            ("passed", "PASSED"), ("failures", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))}}
    part.save(status="timed out" if timed_out else ("ok" if rc == 0 else "failed"), exit_code=rc, summary=summary,
              seconds=round(time.time() - t0, 1), **result, output_tail="\n".join(lines[-40:]))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def part_ioi_step(s: dict, part: Part, budget: float) -> None:
    from bench import step_bench
    from edgeprune_fast.ops import use_backend

    c, dev = s["ioi"], s["device"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA GPU is available (use --cpu-smoke on a CPU machine)")
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if dev == "cuda" else 8.0
    args = SimpleNamespace(device=dev, dtype=c["dtype"], reps=c["reps"], method_seconds=c["method_seconds"],
                           baseline_seconds=c["baseline_seconds"], no_baseline=False,
                           baseline_max_gb=round(0.8 * total_gb, 1))
    point = step_bench.Point(c["layers"], c["batch"], c["seq"], "single")
    part.save(setting={"model": "GPT2Config() width" if not c["gpt2"] else f"GPT2Config({c['gpt2']})",
                       "n_layer": c["layers"], "batch": c["batch"], "seq": c["seq"], "dtype": c["dtype"],
                       "device": dev, "forced_backend": s["backend"], "split_embeds": True, "node_masks": True,
                       "ablation": "corrupted", "reps": c["reps"]},
              what="median step time after one warm-up (methods timed in turn), peak above the start of a step "
                   "(torch.cuda.max_memory_allocated on CUDA); bench/step_bench.py measure_point")
    with use_backend(s["backend"]):
        rows, skipped = step_bench.measure_point(point, args, _dtype(c["dtype"]), ["hf_floor", "ours", "original"],
                                                 config=c["gpt2"])
        part.save(rows=rows, skipped=skipped)
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=c["layers"], **c["gpt2"])).to(dev, _dtype(c["dtype"]))
        hf.eval().requires_grad_(False)
        ids, cids = (torch.randint(0, hf.config.vocab_size, (c["batch"], c["seq"]), device=dev) for _ in range(2))
        lines = step_bench.profile_lines(step_bench.ours_step(hf)[0], ids, cids, dev,
                                         f"ours, one step at the IOI setting ({c['dtype']}, {dev})", row_limit=20)
    part.save(profile="\n".join(lines))


def _mix_inputs(R: int, W: int, M: int, dtype: torch.dtype, dev: str):
    """The model's form of a read (model.py ``_read``): the slots hold clean - corrupted
    [W, M] in the model dtype, the corrupted prefix sum comes as a float32 base [M], node
    masks on, explicit uniforms (as the model draws them)."""
    g = torch.Generator(device=dev).manual_seed(0)
    la = 2.0 * torch.randn(R, W, device=dev, generator=g)
    ln = 2.0 * torch.randn(W, device=dev, generator=g)
    ue = 0.01 + 0.98 * torch.rand(R, W, device=dev, generator=g)
    un = 0.01 + 0.98 * torch.rand(W, device=dev, generator=g)
    delta = torch.randn(W, M, device=dev, generator=g).to(dtype)
    base = torch.randn(M, device=dev, generator=g)
    grad_x = torch.randn(R, M, device=dev, generator=g).to(dtype)
    return la, ln, ue, un, delta, base, grad_x


def _check_against_reference(x, z, grad_z, grad_clean, la, ln, ue, un, delta, base, grad_x,
                             interpreted: bool) -> dict:
    """Max errors of the kernels' x, z_eff, grad_z and grad_clean (grad_clean_out started at
    delta) against the maths in float64 (float32 inputs) or float32 (16-bit inputs),
    beside plain torch's own error in the inputs' dtype; column chunks keep memory small.
    ok: each error at most twice torch's plus 1e-5 of the reference's largest entry, plus one
    bfloat16 ulp of it under Triton's interpreter, whose float32 -> bfloat16 casts truncate
    (triton/runtime/interpreter.py ``cast_impl``; the GPU rounds to nearest)."""
    from edgeprune_fast.ops import HardConcreteParams, hard_concrete_reference

    p = HardConcreteParams()
    dt = delta.dtype
    acc = torch.float64 if dt == torch.float32 else torch.float32
    z_ref = hard_concrete_reference(la, ue, params=p) * hard_concrete_reference(ln, un, params=p)[None, :]
    za, zl = z_ref.to(acc), z_ref.to(dt)
    gz_ref = torch.zeros(z.shape, dtype=acc, device=z.device)
    gz_low = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    err = {"x": [0.0, 0.0, 0.0], "grad_clean": [0.0, 0.0, 0.0]}  # kernel error, torch's error, reference scale

    def note(name, got, ref, low):
        e = err[name]
        e[0] = max(e[0], (got.to(acc) - ref).abs().max().item())
        e[1] = max(e[1], (low.to(acc) - ref).abs().max().item())
        e[2] = max(e[2], ref.abs().max().item())

    step = max(1, (1 << 24) // max(1, delta.shape[0]))
    for m0 in range(0, delta.shape[1], step):
        sl = slice(m0, m0 + step)
        d, g = delta[:, sl].to(acc), grad_x[:, sl].to(acc)
        note("x", x[:, sl], za @ d + base[sl].to(acc), ((zl @ delta[:, sl]).float() + base[sl]).to(dt))
        note("grad_clean", grad_clean[:, sl], d + za.T @ g, delta[:, sl] + zl.T @ grad_x[:, sl])
        gz_ref += g @ d.T
        gz_low += (grad_x[:, sl] @ delta[:, sl].T).float()
    slack = 1e-5 + (torch.finfo(dt).eps if interpreted and dt == torch.bfloat16 else 0.0)
    out = {}
    for name, (e, e_torch, scale) in err.items():
        out[name] = {"max_error": e, "torch_max_error": e_torch, "ok": e <= 2 * e_torch + slack * scale}
    e, e_torch = (grad_z.to(acc) - gz_ref).abs().max().item(), (gz_low.to(acc) - gz_ref).abs().max().item()
    out["grad_z"] = {"max_error": e, "torch_max_error": e_torch,
                     "ok": e <= 2 * e_torch + 1e-5 * gz_ref.abs().max().item()}
    e = (z - z_ref).abs().max().item()
    out["z_eff"] = {"max_error": e, "ok": e <= 1e-5}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def _bandwidth_groups(family: str, config: dict, split_embeds: bool):
    """The largest attention read (the last layer's), and the final resid_post read (every writer)."""
    from transformers import GPT2Config, LlamaConfig

    from edgeprune_fast.graph import Graph
    from edgeprune_fast.models import graph_config_from_hf

    cfg = GPT2Config(**config) if family == "gpt2" else LlamaConfig.from_dict(config)
    graph = Graph(graph_config_from_hf(cfg, split_embeds=split_embeds))
    attn = [g for g in graph.groups if g.key.startswith("a")][-1]
    return cfg, [attn, graph.groups[-1]]


def _measure_mix(kernels, params, R: int, W: int, M: int, dt: torch.dtype, dev: str, reps: int, interpreted: bool,
                 peak: dict) -> dict:
    """One read's forward and backward kernels: checked against the reference, then timed."""
    from bench.common import median_time
    from edgeprune_fast.ops.backends.triton import load_kernels

    la, ln, ue, un, delta, base, grad_x = _mix_inputs(R, W, M, dt, dev)

    def fwd():
        return kernels.edge_mix_forward(la, ln, delta, None, ue, un, None, True, params, base=base)

    x, z = fwd()
    sink = delta.clone()  # grad_clean_out: the backward adds into it, as into the model's slot gradient
    grad_z, _ = kernels.mix_backward(grad_x, z, delta, None, grad_clean_out=sink)
    row = {"check": _check_against_reference(x, z, grad_z, sink, la, ln, ue, un, delta, base, grad_x, interpreted)}
    del x, grad_z

    def bwd():
        return kernels.mix_backward(grad_x, z, delta, None, grad_clean_out=sink)

    # the backward's persistent grid at one program per SM instead of two: half the partials'
    # footprint in L2, which matters towards ~1,000 writers (edgeprune_fast/kernels/edge_mix.py docstring)
    one_per_sm = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    mix_backward = load_kernels().mix_backward

    def bwd_one_per_sm():
        return mix_backward(grad_x, z, delta, None, max_programs=one_per_sm, grad_clean_out=sink)

    t_f = median_time(fwd, warmup=1, reps=reps, device=dev)
    t_b = median_time(bwd, warmup=1, reps=reps, device=dev)
    t_b1 = median_time(bwd_one_per_sm, warmup=1, reps=reps, device=dev)
    e = delta.element_size()
    masks = 3 * R * W * 4 + 2 * W * 4  # log_alpha and u read, z_eff written; the node masks' two
    b_f = W * M * e + 4 * M + R * M * e + masks
    b_b = R * M * e + 3 * W * M * e + 2 * R * W * 4  # grad_x, delta, grad_clean twice; z and grad_z
    row.update(forward_seconds=t_f, backward_seconds=t_b, forward_bytes=b_f, backward_bytes=b_b,
               forward_GBps=round(b_f / t_f / 1e9, 1), backward_GBps=round(b_b / t_b / 1e9, 1),
               backward_one_program_per_sm={"programs": one_per_sm, "seconds": t_b1,
                                            "GBps": round(b_b / t_b1 / 1e9, 1)})
    if peak["peak_TBps"]:
        for k in ("forward", "backward"):
            row[f"{k}_percent_of_peak"] = round(100 * row[f"{k}_GBps"] / (peak["peak_TBps"] * 1e3), 1)
    return row


def part_edge_mix_bandwidth(s: dict, part: Part, budget: float) -> None:
    from bench.common import median_time
    from edgeprune_fast.ops import HardConcreteParams, backends
    from edgeprune_fast.ops.backends import triton as triton_backend

    dev, c = s["device"], s["bandwidth"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA GPU is available (use --cpu-smoke on a CPU machine)")
    name = torch.cuda.get_device_name(0) if dev == "cuda" else None
    peak = peak_bandwidth(name)
    why = triton_backend.BACKEND.unavailable("edge_mix", [torch.zeros(1, device=dev)])
    if why:
        raise RuntimeError(f"the Triton backend cannot serve edge_mix here: {'; '.join(why)}")
    kernels, params = triton_backend.BACKEND, HardConcreteParams()
    interpreted = triton_backend.load_kernels().interpreted()
    part.save(peak=peak, what="effective bandwidth = the op's compulsory bytes (each input read once, each output "
                              "written once) / median kernel time; forward: delta [W, M] and base [M] float32 read, "
                              "x [R, M] written, masks; backward (grad_into, as the model calls it): grad_x [R, M] "
                              "and delta read, grad_clean read and written, masks; the [P, R, W] partials not "
                              "counted. Shapes: the model's reads (model.py _read): slots hold clean - corrupted, "
                              "node masks, explicit uniforms, training", interpreted=interpreted, rows=[])
    rows = []
    for label, family, config, n_tokens, split, dtypes in c["models"]:
        cfg, groups = _bandwidth_groups(family, config, split)
        D = cfg.hidden_size
        for group in groups:
            for dname in dtypes:
                dt, R, W, M = _dtype(dname), len(group.readers), group.n_upstream, n_tokens * D
                row = {"model": label, "group": group.key, "R": R, "W": W, "tokens": n_tokens, "D": D, "M": M,
                       "dtype": dname}
                try:
                    row.update(_measure_mix(kernels, params, R, W, M, dt, dev, c["reps"], interpreted, peak))
                except Exception as exc:  # one shape failing (out of memory, a compile error) leaves the others
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                rows.append(row)
                part.save(rows=rows)
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
    if dev == "cuda":  # what a plain device-to-device copy reaches: a practical ceiling beside the data sheet's
        a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        t = median_time(lambda: b.copy_(a), warmup=2, reps=10, device=dev)
        part.save(copy_GBps=round(2 * a.numel() / t / 1e9, 1))
    part.save(edge_mix_backend=backends.choose("edge_mix", [torch.zeros(1, device=dev)]).name if s["backend"] is None
              else s["backend"])


def part_llama_8b(s: dict, part: Part, budget: float) -> None:
    from transformers import LlamaConfig

    from bench import scale_bench
    from edgeprune_fast.ops import use_backend

    c, dev = s["llama"], s["device"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA GPU is available (use --cpu-smoke on a CPU machine)")
    cfg = LlamaConfig.from_dict(c["config"])
    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if dev == "cuda" else c["device_gb"]
    plans = []
    with use_backend(s["backend"]):
        for batch, ckpt in c["candidates"]:
            point = {"config": c["config"], "vocab": cfg.vocab_size, "batch": batch, "seq": c["seq"],
                     "dtype": c["dtype"], "checkpoint_layers": ckpt, "device_gb": round(device_gb, 2)}
            p, backend = scale_bench.prediction(cfg, point, dev)
            plans.append({"point": point, "predicted_peak_bytes": p.peak_bytes, "peak_phase": p.peak_phase,
                          "fits": p.fits, "edge_mix_backend": backend, "table": p.table()})
        part.save(model={k: c["config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size")},
                  n_params=p.shape.params(), n_writers=p.shape.n_writers, n_edges=p.shape.n_edges,
                  device_gb=round(device_gb, 2), plans=[{k: v for k, v in x.items() if k != "table"} for x in plans],
                  what="random weights from the config, built on the device in the model dtype; one step as the "
                       "planner's: reference passes, masked forward, KL + sparsity, backward, AdamW; measured: peak "
                       "above the step's start against the plan minus weights and masks (predicted_step_bytes), "
                       "and the total peak against the plan's peak; bench/scale_bench.py measure",
                  runs=[])
        runs = []
        for plan_row in [x for x in plans if x["fits"]][:2]:  # the first that fits; the next if it runs out of memory
            run = {"point": {k: v for k, v in plan_row["point"].items() if k != "config"},
                   "plan_table": plan_row["table"]}
            t0 = time.time()
            try:
                run["measured"] = {k: v for k, v in scale_bench.measure(plan_row["point"], dev, reps=c["reps"]).items()
                                   if k != "config"}
            except torch.cuda.OutOfMemoryError as exc:
                run["error"] = f"out of memory: {str(exc)[:400]}"
            run["seconds_with_build"] = round(time.time() - t0, 1)
            runs.append(run)
            part.save(runs=runs)
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
            if "measured" in run:
                break


PARTS = {"versions": part_versions, "tests": part_tests, "ioi_step": part_ioi_step,
         "edge_mix_bandwidth": part_edge_mix_bandwidth, "llama_8b": part_llama_8b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=list(PARTS))
    ap.add_argument("--mode", choices=list(SETTINGS), default="gpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for PART.json")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds this part may take (the script's limit)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    part = Part(args.part, args.out)
    part.save(part=args.part, mode=args.mode, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    PARTS[args.part](SETTINGS[args.mode], part, args.budget)
    part.save(finished=time.strftime("%Y-%m-%d %H:%M:%S"))


if __name__ == "__main__":
    main()
