"""Helpers shared by the benchmarks: the machine and code revision a figure came from,
CPU peak-memory measurement, and timing.

CPU peak memory is the process's resident high-water mark (VmHWM), reset through
/proc/self/clear_refs before each measurement; glibc's mmap threshold is fixed (set
MALLOC_MMAP_THRESHOLD_ before the process starts, as `reexec_with_fixed_malloc` does) so
that large freed tensors go back to the OS and do not hide later peaks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def reexec_with_fixed_malloc() -> None:
    """Restart this script once with a fixed malloc mmap threshold (see module docstring)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = dict(os.environ, **MALLOC_ENV)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    # started with `python -m bench.x`: restart the same way, so package imports keep working
    target = ["-m", spec.name] if spec is not None and spec.name else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *target, *sys.argv[1:]], env)


def machine() -> dict:
    from edgeprune_fast.info import collect

    info = collect()
    info.pop("backends")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=True).stdout.strip()
        info["git_revision"] = rev + ("+dirty" if dirty else "")
    except Exception:
        info["git_revision"] = "unknown"
    info["cpu_model"] = _cpu_model()
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at entry, in bytes: CUDA allocator stats on GPU,
    the resident high-water mark on CPU. On CUDA also ``total_peak_bytes``: the peak of
    everything allocated (what was there at entry included)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_bytes = 0
        self.total_peak_bytes = 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.total_peak_bytes = torch.cuda.max_memory_allocated()
            self.peak_bytes = self.total_peak_bytes - self._base
        else:
            self.peak_bytes = _status_kb("VmHWM") * 1024 - self._base
        return False


def median_time(fn, *, warmup: int = 1, reps: int = 3, device: str = "cpu") -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def masked_step(pruned, opt, ids, full_logits, corrupted) -> float:
    """One pruning step on cached references: the masked forward with sampled masks, KL to the
    full logits plus the sparsity terms, backward and ``opt``; the KL."""
    import torch.nn.functional as F

    out = pruned(ids, corrupted_writers=corrupted, training=True)
    kl = F.kl_div(out.logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    loss = kl + out.edge_sparsity + out.node_sparsity
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(kl.detach())


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path
