"""`python -m edgeprune_fast.info`: what this installation can do.

Prints the versions of torch, triton and transformers, the GPU if any, whether the
compiled extension `edgeprune_fast._C` is built (and why not), and, for each op, the
backend the automatic choice would use on CPU and on CUDA tensors with the reasons the
others were not chosen.
"""

from __future__ import annotations

import importlib
import platform

import torch

from .ops import backends


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no version)")
    except Exception as exc:  # report, never fail
        return f"not available ({type(exc).__name__}: {exc})"


def _native_status() -> str:
    try:
        from . import _native
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return "built" if _native.load() is not None else f"not built ({_native.load_error()})"


def collect() -> dict:
    """Everything `main` prints, as a dict (used by benchmarks to record the machine)."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "extension _C": _native_status(),
        "backends": {},
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        sample = [torch.zeros(2, 2, device=device)]
        for op in backends.OPS:
            rows = backends.report(op, sample)
            chosen = next((name for name, why in rows if not why), None)
            info["backends"][f"{op} on {device}"] = {"chosen": chosen, "not chosen": {n: w for n, w in rows if n != chosen}}
    return info


def main() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key != "backends":
            print(f"{key:<{width}}  {value}")
    forced, how = backends.forced_name()
    print(f"\nbackend choice: {'forced to ' + forced + ' by ' + how if forced else 'automatic'}")
    for op, row in info["backends"].items():
        print(f"  {op:<24} -> {row['chosen']}")
        for name, why in row["not chosen"].items():
            if why:
                print(f"      {name}: not chosen: {'; '.join(why)}")
    if not torch.cuda.is_available():
        print("\nno CUDA GPU: CPU tensors run on the C++ extension when built, else on the reference backend")


if __name__ == "__main__":
    main()
