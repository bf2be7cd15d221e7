"""Build of edgeprune_fast with its C++ extension ``edgeprune_fast._C``.

Metadata and dependencies live in pyproject.toml; this file adds what setuptools cannot
declare there: the extension, built with torch.utils.cpp_extension from the sources listed
in csrc/sources.txt (the list CMakeLists.txt reads too); the Triton kernels are the
package's own ``edgeprune_fast/kernels/`` (never a top-level ``kernels``: that name is Hugging
Face's kernels package, which transformers >= 5.25 requires and imports).

Build with torch already installed and without build isolation (an isolated build would
pull a multi-GB CUDA torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev]"

EDGEPRUNE_BUILD_CUDA=0/1 turns CUDA sources (the .cu files in csrc/sources.txt) off/on; by
default they are built where torch has CUDA and nvcc is found. There are no CUDA sources
today (the Triton kernels serve CUDA tensors), so the extension is CPU-only everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
OPENMP = ["-fopenmp"]


def listed_sources() -> list[str]:
    """csrc/sources.txt: one source a line, '#' comments (shared with CMakeLists.txt)."""
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [f"csrc/{s.strip()}" for s in lines if s.strip() and not s.lstrip().startswith("#")]


def build_cuda(cuda_sources: list[str]) -> bool:
    flag = os.environ.get("EDGEPRUNE_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "on", "yes") and cuda_sources and not available:
        raise RuntimeError("EDGEPRUNE_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)")
    return bool(cuda_sources) and available


def extension():
    sources = listed_sources()
    cuda_sources = [s for s in sources if s.endswith(".cu")]
    cpp_sources = [s for s in sources if not s.endswith(".cu")]
    with_cuda = build_cuda(cuda_sources)
    define = [("EDGEPRUNE_TORCH_VERSION", f'"{torch.__version__}"')] + ([("EDGEPRUNE_WITH_CUDA", "1")] if with_cuda else [])
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="edgeprune_fast._C",
        sources=cpp_sources + (cuda_sources if with_cuda else []),
        define_macros=define,
        # -fopenmp: ATen's at::parallel_for is an inline OpenMP region compiled into this module;
        # without it the tiles run on one thread and every GEMM forks its own thread team.
        extra_compile_args={"cxx": OPENMP + ["-O3"], "nvcc": ["-O3"]} if with_cuda else OPENMP + ["-O3"],
        extra_link_args=OPENMP,
    )


setup(
    # namespace packages too, so that the data folders (no __init__.py) ship as package data
    packages=find_namespace_packages(include=["edgeprune_fast", "edgeprune_fast.*"], exclude=["*.__pycache__"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
