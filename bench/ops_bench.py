"""edge_mix forward + backward, per backend, against the original Edge Pruning formulation,
at GPT-2-small layer shapes (R = 37 readers of one layer, D = 768, W upstream writers).

The original formulation (ARCHITECTURE.md §3): masks sampled in separate PyTorch ops,
then two einsums over the clean and corrupted writer stacks,
    x = einsum('rw,wnd->rnd', z, clean) + einsum('rw,wnd->rnd', 1 - z, corrupt),
backward by autograd. The original keeps stacks of all W_total = 158 writer slots and
contracts over all of them at every layer (`original_full_stack`); `original_same_W`
contracts over the layer's W upstream writers only (the stricter comparison).

Implementations: the two original formulations, and edge_mix forward+backward through each
backend that can serve the device (`cpp`: the C++ extension; `triton`: CUDA only here;
`reference`: plain PyTorch), forced with use_backend.

Writes bench/results/ops_<device>.json (float32; ops_<device>_<dtype>.json for other dtypes)
and a .csv beside it with one row per (shape, implementation): time (median after warm-up)
and peak memory above the inputs; "extra" memory is the peak minus the op's own outputs
(x and grad_clean), as a multiple of x's size.

    python bench/ops_bench.py [--tokens 256 2048] [--writers 2 41 158] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv

import torch
from common import PeakMemory, machine, median_time, reexec_with_fixed_malloc, write_json

from edgeprune_fast.ops import HardConcreteParams, edge_mix, use_backend
from edgeprune_fast.ops.backends import reasons

R, D, W_TOTAL = 37, 768, 158
P = HardConcreteParams()


def original_step(la, ln, clean, corrupt, grad_out, w_slots):
    """The original code's read for one layer: sample, pad masks to all slots, two einsums."""
    R_, W = la.shape
    u = torch.rand(R_, W, device=la.device).clamp(P.eps, 1 - P.eps)
    un = torch.rand(W, device=la.device).clamp(P.eps, 1 - P.eps)
    z_edge = (torch.sigmoid((u.log() - (1 - u).log() + la) / P.beta) * (P.right - P.left) + P.left).clamp(0, 1)
    z_node = (torch.sigmoid((un.log() - (1 - un).log() + ln) / P.beta) * (P.right - P.left) + P.left).clamp(0, 1)
    z = z_edge * z_node
    if w_slots > W:  # slots of writers not yet written carry mask 0 but are still contracted
        z = torch.cat([z, z.new_zeros(R_, w_slots - W)], dim=1)
    x = torch.einsum("rw,wnd->rnd", z, clean) + torch.einsum("rw,wnd->rnd", 1 - z, corrupt)
    x.backward(grad_out)
    return x


def ours_step(la, ln, clean, corrupt, grad_out, backend):
    with use_backend(backend):
        x, _ = edge_mix(la, clean, corrupt, log_alpha_node=ln, seed=0)
        x.backward(grad_out)
    return x


def measure(fn, tensors, device, reps):
    def run():
        for t in tensors:
            t.grad = None
        fn()

    with PeakMemory(device) as mem:  # the warm-up run: its peak is every run's peak
        run()
    seconds = median_time(run, warmup=0, reps=reps, device=device)
    return seconds, mem.peak_bytes


def bench_shape(n_tokens, w, device, dtype, reps):
    la = torch.full((R, w), 3.0, device=device).add_(torch.randn(R, w, device=device)).requires_grad_()
    ln = torch.full((w,), 3.0, device=device).requires_grad_()
    grad_out = torch.randn(R, n_tokens, D, device=device, dtype=dtype)
    out_bytes = grad_out.numel() * grad_out.element_size()
    rows = []
    for impl in ("original_full_stack", "original_same_W", "cpp", "triton", "reference"):
        if impl.startswith("original"):
            slots = W_TOTAL if impl == "original_full_stack" else w
            clean = torch.randn(slots, n_tokens, D, device=device, dtype=dtype, requires_grad=True)
            corrupt = torch.randn(slots, n_tokens, D, device=device, dtype=dtype)

            def fn(clean=clean, corrupt=corrupt, slots=slots):
                return original_step(la, ln, clean, corrupt, grad_out, slots)
        else:
            probe = torch.zeros(1, device=device, dtype=dtype)
            why = reasons(impl, "edge_mix", [probe], auto=False)
            if why or (impl == "triton" and device != "cuda"):
                rows.append({"impl": impl, "skipped": "; ".join(why) or "Triton is benchmarked on CUDA only"})
                continue
            slots = w
            clean = torch.randn(w, n_tokens, D, device=device, dtype=dtype, requires_grad=True)
            corrupt = torch.randn(w, n_tokens, D, device=device, dtype=dtype)

            def fn(clean=clean, corrupt=corrupt, impl=impl):
                return ours_step(la, ln, clean, corrupt, grad_out, impl)
        seconds, peak = measure(fn, [la, ln, clean], device, reps)
        grad_clean_bytes = clean.numel() * clean.element_size()
        rows.append({
            "impl": impl, "slots": slots, "time_s": round(seconds, 5), "peak_bytes": peak,
            "extra_bytes": peak - out_bytes - grad_clean_bytes,
            "extra_over_output": round((peak - out_bytes - grad_clean_bytes) / out_bytes, 3),
        })
        del clean, corrupt, fn
    return {"tokens": n_tokens, "W": w, "R": R, "D": D, "output_bytes": out_bytes, "rows": rows}


def summarise(shape):
    by = {r["impl"]: r for r in shape["rows"] if "time_s" in r}
    ours = [r for k, r in by.items() if not k.startswith("original") and k != "reference"]
    if not ours:
        ours = [by["reference"]]
    best = min(ours, key=lambda r: r["time_s"])
    return {
        "tokens": shape["tokens"], "W": shape["W"], "fastest": best["impl"], "time_s": best["time_s"],
        "speedup_vs_original_same_W": round(by["original_same_W"]["time_s"] / best["time_s"], 2),
        "speedup_vs_original_full_stack": round(by["original_full_stack"]["time_s"] / best["time_s"], 2),
        "extra_memory_over_output": best["extra_over_output"],
    }


def main():
    reexec_with_fixed_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--writers", type=int, nargs="+", default=[2, 41, 158])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    shapes = []
    for n in args.tokens:
        for w in args.writers:
            shape = bench_shape(n, w, args.device, dtype, args.reps)
            shapes.append(shape)
            s = summarise(shape)
            print(f"N={n:5d} W={w:3d}  fastest={s['fastest']:<9} {s['time_s']*1e3:8.1f} ms  "
                  f"x{s['speedup_vs_original_same_W']:.2f} vs same-W original, "
                  f"x{s['speedup_vs_original_full_stack']:.2f} vs full-stack original, "
                  f"extra memory {s['extra_memory_over_output']:.2f}x output", flush=True)
    summary = [summarise(s) for s in shapes]
    payload = {
        "benchmark": "edge_mix forward+backward vs the original formulation (GPT-2-small layer shapes)",
        "machine": machine(), "device": args.device, "dtype": args.dtype, "reps": args.reps,
        "targets": {"cpu_speedup_min": 2.0, "cpu_extra_memory_over_output_max": 1.2},
        "summary": summary, "shapes": shapes,
    }
    stem = f"ops_{args.device}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    path = write_json(f"{stem}.json", payload)
    write_csv(path.with_suffix(".csv"), shapes)
    print(f"wrote {path} and {path.with_suffix('.csv').name}")


def write_csv(path, shapes):
    fields = ["tokens", "W", "R", "D", "impl", "slots", "time_s", "peak_bytes", "extra_bytes", "extra_over_output",
              "skipped"]
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        for shape in shapes:
            for row in shape["rows"]:
                out.writerow({k: v for k, v in {**shape, **row}.items() if k in fields})


if __name__ == "__main__":
    main()
