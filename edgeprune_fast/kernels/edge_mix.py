"""The fused edge_mix op in Triton: mask sampling, node masks and clean/corrupted mixing in
one pass over the writer outputs, and one fused backward pass for the mixing.

Maths (ARCHITECTURE.md §2). R readers, W writers, M = B*S*D columns, row-major 2D views:

    z_eff[r, w] = z_edge[r, w] * z_node[w]                                   [R, W] float32
    x[r, m]     = base[m] + sum_w corrupt[w, m] + sum_w z_eff[r, w] * (clean[w, m] - corrupt[w, m])
    grad_z[r, w]     = sum_m grad_x[r, m] * (clean[w, m] - corrupt[w, m])   [R, W] float32
    grad_clean[w, m] = sum_r z_eff[r, w] * grad_x[r, m]                      [W, M]

clean, corrupt, x, grad_x, grad_clean: float32, bfloat16 or float16 (corrupt None = zero
ablation); base [M] float32 or None, a constant start shared by every reader (added in
the float32 accumulator, so x is rounded once); accumulation is float32 (`tl.dot` with
ieee precision for float32 inputs, tf32
for 16-bit inputs, whose own rounding is coarser).

Forward `_edge_mix_fwd_kernel`: grid (column blocks of M, reader blocks of R). Per writer
block a program gets the z_eff tile of its readers, loads the clean and corrupt tiles once
and accumulates dot(z_eff, clean - corrupt) and sum_w corrupt. Nothing of size [R, W, M]
exists; when R fits one reader block (R <= 64) every element of clean/corrupt is read
from memory exactly once. The masks (from u, from Philox with counters r*W + w for edges
and R*W + w for nodes, or deterministic) are either sampled inside this kernel, the
first column block writing z_eff (one launch, used when M fits one column block), or by
`_edge_mix_masks_kernel`, a pre-pass over the R*W entries, the mixing kernel then loading
z_eff tiles from L2. Why the pre-pass: a sample costs ~150 scalar ops (Philox rounds,
two logs, a sigmoid); redone by every column program that is 150*R/BLOCK_M (75 at R = 64,
BLOCK_M = 128) ops per column of a writer, several times the memory time of its 2-4 bytes
on an H100 (an estimate, not yet timed). Both paths give the same bits.

Backward `_mix_bwd_kernel`: a persistent grid of at most `max_programs` programs, each
taking column blocks pid, pid + P, ... For a column block it loads grad_x once, then per
writer block stores grad_clean = dot(z^T, grad_x) and adds dot(grad_x, (clean -
corrupt)^T) into its own fp32 slice partials[pid] of a [P, R, W] buffer (no atomics).
grad_z = partials.sum(0) in torch: the same inputs give the same bits. Why persistent:
one slice per column block would be M/64 * R * W * 4 bytes (124 MB at GPT-2 small, batch
8 x 32 tokens, R = 64, W = 158), more than the writer outputs themselves; 2 slices per SM
are ~10 MB there and stay in L2.

Memory traffic per call, for bandwidth figures (e = element size of clean, c = 2 with
corrupt and 1 under zero ablation, n_r = cdiv(R, 64) reader blocks, 1 up to R = 64, B_M
the backward's column tile, 64 for 16-bit inputs and 32 for float32):

    forward   DRAM  n_r*c*W*M*e read + R*M*e written (+ R*W*4 masks)
    backward  DRAM  c*W*M*e + R*M*e read, W*M*e written, + 2*P*R*W*4 (partials, their sum)
                    (+ W*M*e read with grad_clean_out, the model's call)
              L2    8*R*W bytes of partial read-modify-write per B_M columns (8*R*W*M/B_M in
                    all), and for R > 64 grad_x re-read once per writer block of 16

so the floor the benchmark can divide by is (c*W + R)*M*e forward and ((c+1)*W + R)*M*e
backward; e.g. W = 158, R = 37, M = 8*32*768 (GPT-2 small, batch 8 x 32 tokens) in bf16:
139 MB forward, 201 MB backward. Towards ~1,000 writers the partials grow with R*W: at
Llama-3.1-8B's last attention read (R = 48, W = 1,024, bf16) their read-modify-write per
64 columns (393 KB) is as large as the DRAM traffic of those columns (the model's call:
(R + 3W)*64*2 = 400 KB), and 2 slices per SM are 52 MB on an H100 (132 SMs), about its
50 MB L2. Whether that costs DRAM bandwidth there is for the GPU to say: bench/gpu_check.sh
times that shape with the default grid and with one program per SM (``max_programs``,
26 MB of partials).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .hard_concrete import _hard_concrete_z, kernel_args

MAX_BLOCK_R = 64  # readers per program: a GPT-2 layer has 37 (small) to 61 (large); more use reader blocks


@triton.jit
def _z_eff_tile(z_ptr, la_node_ptr, u_edge_ptr, u_node_ptr, offs_r, offs_w, R, W,
                seed, beta, scale, left, eps,
                GIVEN_Z: tl.constexpr, HAS_NODE: tl.constexpr, TRAINING: tl.constexpr, USE_SEED: tl.constexpr):
    """z_eff for readers offs_r x writers offs_w, 0 outside [R, W]. z_ptr holds z itself
    (GIVEN_Z) or log_alpha_edge."""
    mask = (offs_r[:, None] < R) & (offs_w[None, :] < W)
    idx = offs_r[:, None] * W + offs_w[None, :]
    if GIVEN_Z:
        z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        la = tl.load(z_ptr + idx, mask=mask, other=0.0)
        z = _hard_concrete_z(la, u_edge_ptr, idx, mask, seed, idx, beta, scale, left, eps, TRAINING, USE_SEED)
        if HAS_NODE:
            mask_w = offs_w < W
            la_n = tl.load(la_node_ptr + offs_w, mask=mask_w, other=0.0)
            z_n = _hard_concrete_z(la_n, u_node_ptr, offs_w, mask_w, seed, R * W + offs_w,
                                   beta, scale, left, eps, TRAINING, USE_SEED)
            z = z * z_n[None, :]
    return tl.where(mask, z, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _edge_mix_masks_kernel(z_out_ptr, la_edge_ptr, la_node_ptr, u_edge_ptr, u_node_ptr, R, W, seed, beta, scale, left,
                           eps, HAS_NODE: tl.constexpr, TRAINING: tl.constexpr, USE_SEED: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """The sampling pre-pass: z_eff [R, W], each entry once (see edge_mix_forward)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    z = _z_eff_tile(la_edge_ptr, la_node_ptr, u_edge_ptr, u_node_ptr, offs_r, offs_w, R, W,
                    seed, beta, scale, left, eps, False, HAS_NODE, TRAINING, USE_SEED)
    tl.store(z_out_ptr + offs_r[:, None] * W + offs_w[None, :], z, mask=(offs_r[:, None] < R) & (offs_w[None, :] < W))


@triton.jit(do_not_specialize=["seed"])
def _edge_mix_fwd_kernel(x_ptr, z_out_ptr, z_ptr, la_node_ptr, u_edge_ptr, u_node_ptr, clean_ptr, corrupt_ptr,
                         base_ptr, R, W, M, seed, beta, scale, left, eps,
                         GIVEN_Z: tl.constexpr, HAS_NODE: tl.constexpr, TRAINING: tl.constexpr,
                         USE_SEED: tl.constexpr, HAS_CORRUPT: tl.constexpr, HAS_BASE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    base = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        z = _z_eff_tile(z_ptr, la_node_ptr, u_edge_ptr, u_node_ptr, offs_r, offs_w, R, W,
                        seed, beta, scale, left, eps, GIVEN_Z, HAS_NODE, TRAINING, USE_SEED)
        if not GIVEN_Z:
            # one column block writes z_eff; the others only use it. A branch, not a scalar in
            # the mask: Triton 3.9's interpreter rejects `tensor & (pid_m == 0)` as a mask
            if pid_m == 0:
                tl.store(z_out_ptr + offs_r[:, None] * W + offs_w[None, :], z,
                         mask=(offs_r[:, None] < R) & (offs_w[None, :] < W))
        mask_t = (offs_w[:, None] < W) & mask_m[None, :]
        ptrs = offs_w.to(tl.int64)[:, None] * M + offs_m[None, :]  # int64: W*M may pass 2**31
        diff = tl.load(clean_ptr + ptrs, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_CORRUPT:
            corrupt = tl.load(corrupt_ptr + ptrs, mask=mask_t, other=0.0).to(tl.float32)
            base += tl.sum(corrupt, axis=0)
            diff = diff - corrupt
        acc = tl.dot(z, diff, acc, input_precision=DOT_PRECISION)
    if HAS_BASE:
        base += tl.load(base_ptr + offs_m, mask=mask_m, other=0.0)
    if HAS_CORRUPT or HAS_BASE:
        acc += base[None, :]
    mask_x = (offs_r[:, None] < R) & mask_m[None, :]
    x_ptrs = x_ptr + offs_r.to(tl.int64)[:, None] * M + offs_m[None, :]
    tl.store(x_ptrs, acc.to(x_ptr.dtype.element_ty), mask=mask_x)


@triton.jit
def _mix_bwd_kernel(grad_clean_ptr, partials_ptr, grad_x_ptr, z_ptr, clean_ptr, corrupt_ptr,
                    R, W, M, n_col_blocks,
                    HAS_CORRUPT: tl.constexpr, ONE_R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    part_base = partials_ptr + pid.to(tl.int64) * R * W  # this program's own [R, W] slice
    offs_r0 = tl.arange(0, BLOCK_R)
    for cb in range(pid, n_col_blocks, n_prog):
        offs_m = cb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if ONE_R_BLOCK:
            # all readers in one tile: grad_x of these columns is read once
            g_one = tl.load(grad_x_ptr + offs_r0.to(tl.int64)[:, None] * M + offs_m[None, :],
                            mask=(offs_r0[:, None] < R) & mask_m[None, :], other=0.0).to(tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask_t = (offs_w[:, None] < W) & mask_m[None, :]
            ptrs = offs_w.to(tl.int64)[:, None] * M + offs_m[None, :]
            diff = tl.load(clean_ptr + ptrs, mask=mask_t, other=0.0).to(tl.float32)
            if HAS_CORRUPT:
                diff = diff - tl.load(corrupt_ptr + ptrs, mask=mask_t, other=0.0).to(tl.float32)
            acc_c = tl.zeros((BLOCK_W, BLOCK_M), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + offs_r0
                mask_rw = (offs_r[:, None] < R) & (offs_w[None, :] < W)
                if ONE_R_BLOCK:
                    g = g_one
                else:
                    g = tl.load(grad_x_ptr + offs_r.to(tl.int64)[:, None] * M + offs_m[None, :],
                                mask=(offs_r[:, None] < R) & mask_m[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_r[:, None] * W + offs_w[None, :], mask=mask_rw, other=0.0).to(tl.float32)
                acc_c = tl.dot(tl.trans(z), g, acc_c, input_precision=DOT_PRECISION)
                part = tl.dot(g, tl.trans(diff), input_precision=DOT_PRECISION)
                part_ptrs = part_base + offs_r[:, None] * W + offs_w[None, :]
                # add what earlier column blocks left; the first one starts the slice (no zero fill)
                if cb != pid:
                    part += tl.load(part_ptrs, mask=mask_rw, other=0.0)
                tl.store(part_ptrs, part, mask=mask_rw)
            if ACCUMULATE:  # add to the caller's gradient (summed in float32)
                acc_c += tl.load(grad_clean_ptr + ptrs, mask=mask_t, other=0.0).to(tl.float32)
            tl.store(grad_clean_ptr + ptrs, acc_c.to(grad_clean_ptr.dtype.element_ty), mask=mask_t)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products; 16-bit inputs: tf32, finer than their own rounding
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(kernel: str, R: int, M: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options of the "fwd" or "bwd" mixing kernel: fixed by the dtype and
    the reader count, no autotuning (nothing is timed or compiled at import).

    Tiles are >= 16 (tl.dot's minimum) and masked at the edges. d_model and the writer count
    never change a tile: the columns are M = batch * seq * d_model flattened (d_model 768 to
    4096 only lengthen the column grid), and W only lengthens the writer loop (158 writers at
    GPT-2 small, 1,057 at Llama-3.1-8B: 10 to 67 steps of 16). Readers: up to 64 in one tile
    (GPT-2 small's 36 attention readers, Llama-3.1-8B's 48), reader blocks beyond.

    The choices are those whose sm_90 builds spill no registers with both the GPU image's
    Triton 3.6 and Triton 3.9 (ptxas -v on ahead-of-time builds, no GPU needed; checked by
    tests/ops/test_triton_backend.py::test_kernels_build_for_h100); they are not timed yet
    (bench/gpu_check.sh measures them). 16-bit inputs use tf32 dots; float32 (ieee) dots are
    built from FMAs and need narrower tiles: in the backward, 32 columns and 8 warps (64
    columns spill up to 1.8 KB a thread on Triton 3.9 and 28 bytes on 3.6)."""
    ieee = dtype == torch.float32
    block_r = min(MAX_BLOCK_R, max(16, triton.next_power_of_2(R)))
    if kernel == "fwd":
        block_w, block_m_max, num_stages = (16, 64, 3) if ieee else (32, 128, 3)
    else:
        block_w, block_m_max, num_stages = (16, 32, 2) if ieee else (16, 64, 1)
    block_m = min(block_m_max, max(16, triton.next_power_of_2(M)))
    num_warps = 8 if (kernel == "bwd" and ieee) or block_r * block_m >= 2048 else 4
    return dict(BLOCK_R=block_r, BLOCK_W=block_w, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages)


def _check_writers(clean2d: torch.Tensor, corrupt2d: torch.Tensor | None, W: int) -> None:
    if clean2d.dim() != 2 or clean2d.shape[0] != W:
        raise ValueError(f"clean2d: expected shape ({W}, M), got {tuple(clean2d.shape)}")
    if corrupt2d is not None and (corrupt2d.shape != clean2d.shape or corrupt2d.dtype != clean2d.dtype):
        raise ValueError(f"corrupt2d: expected clean2d's shape {tuple(clean2d.shape)} and dtype {clean2d.dtype}, "
                         f"got {tuple(corrupt2d.shape)} {corrupt2d.dtype}")


def _launch_forward(z_or_la, la_node, u_edge, u_node, clean2d, corrupt2d, seed, training, params, given_z,
                    fuse_sampling, base):
    R, W = z_or_la.shape
    _check_writers(clean2d, corrupt2d, W)
    M = clean2d.shape[1]
    if base is not None and (base.numel() != M or base.dtype != torch.float32 or base.device != clean2d.device):
        raise ValueError(f"base: expected a float32 tensor of {M} elements on {clean2d.device}, got {base.dtype} "
                         f"{tuple(base.shape)} on {base.device}")
    clean2d = clean2d.contiguous()
    corrupt = clean2d if corrupt2d is None else corrupt2d.contiguous()
    z_or_la = z_or_la.to(torch.float32).contiguous()
    x2d = torch.empty((R, M), dtype=clean2d.dtype, device=clean2d.device)
    z_eff = z_or_la if given_z else torch.empty((R, W), dtype=torch.float32, device=clean2d.device)
    if R == 0:
        return x2d, z_eff
    cfg = _config("fwd", R, M, clean2d.dtype)
    n_col_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))  # >= 1 column program, so z_eff is written
    if given_z:
        hc = dict(seed=0, beta=1.0, scale=1.0, left=0.0, eps=0.0, TRAINING=False, USE_SEED=False)
    else:
        if training and u_edge is None and seed is None:
            raise ValueError("seed: expected an int when training=True and u_edge is None, got None")
        if training and u_edge is not None and la_node is not None and u_node is None:
            raise ValueError("u_node: expected a tensor when u_edge and la_node are given, got None")
        hc = kernel_args(u_edge, seed, training, params)
    has_node = la_node is not None and not given_z
    # unused pointer slots get a real tensor; the constexpr flags keep the kernel off them
    la_node = z_or_la if la_node is None else la_node.to(torch.float32).contiguous()
    u_edge = z_or_la if u_edge is None else u_edge.to(torch.float32).contiguous()
    u_node = z_or_la if u_node is None else u_node.to(torch.float32).contiguous()
    if fuse_sampling is None:
        # every column program would redo the R*W samples (~150 scalar ops each, Philox and
        # logs): past one column block, sampling once in a pre-pass is cheaper than a launch
        fuse_sampling = n_col_blocks == 1
    if not given_z and not fuse_sampling:
        _edge_mix_masks_kernel[(triton.cdiv(R, 32), triton.cdiv(W, 32))](
            z_eff, z_or_la, la_node, u_edge, u_node, R, W, HAS_NODE=has_node, BLOCK_R=32, BLOCK_W=32, **hc)
        z_or_la, given_z = z_eff, True
        hc.update(seed=0, TRAINING=False, USE_SEED=False)  # one compiled variant of the mixing kernel for all modes
    _edge_mix_fwd_kernel[(n_col_blocks, triton.cdiv(R, cfg["BLOCK_R"]))](
        x2d, z_eff, z_or_la, la_node, u_edge, u_node, clean2d, corrupt,
        z_or_la if base is None else base.contiguous().view(M), R, W, M,
        GIVEN_Z=given_z, HAS_NODE=has_node and not given_z, HAS_CORRUPT=corrupt2d is not None,
        HAS_BASE=base is not None, DOT_PRECISION=_dot_precision(clean2d.dtype), **cfg, **hc)
    return x2d, z_eff


def edge_mix_forward(la_edge: torch.Tensor, la_node: torch.Tensor | None, clean2d: torch.Tensor,
                     corrupt2d: torch.Tensor | None, u_edge: torch.Tensor | None, u_node: torch.Tensor | None,
                     seed: int | None, training: bool, params, fuse_sampling: bool | None = None,
                     base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x2d [R, M] in clean's dtype, z_eff [R, W] float32): masks sampled (from u_edge/u_node,
    or from Philox with ``seed`` when training and u_edge is None, or deterministic when not
    training) and mixed in one pass over clean/corrupt.

    ``fuse_sampling``: True samples inside the mixing kernel (one launch; each column
    program redoes the R*W samples), False samples once in `_edge_mix_masks_kernel` first
    (two launches); None picks fused only when M fits one column block. Same bits either way.
    ``base`` [M] float32: added to every reader's row (see the module docstring)."""
    if not training:
        u_edge = u_node = None
    return _launch_forward(la_edge, la_node, u_edge, u_node, clean2d, corrupt2d, seed, training, params, False,
                           fuse_sampling, base)


def mix_forward(z: torch.Tensor, clean2d: torch.Tensor, corrupt2d: torch.Tensor | None,
                base: torch.Tensor | None = None) -> torch.Tensor:
    """x2d [R, M] in clean's dtype for given masks z [R, W] (the same kernel, no sampling)."""
    return _launch_forward(z, None, None, None, clean2d, corrupt2d, None, False, None, True, False, base)[0]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # two resident programs per SM; each keeps its partial grad_z slice hot in L2
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one by one


def mix_backward(grad_x2d: torch.Tensor, z: torch.Tensor, clean2d: torch.Tensor, corrupt2d: torch.Tensor | None,
                 max_programs: int | None = None,
                 grad_clean_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_z [R, W] float32, grad_clean2d [W, M] in clean's dtype), one fused pass.
    ``max_programs`` caps the persistent grid (default: 2 per SM on CUDA). ``grad_clean_out``
    (contiguous, clean's shape and dtype): grad_clean is added into it, in the same pass, and
    it is returned."""
    R, W = z.shape
    _check_writers(clean2d, corrupt2d, W)
    M = clean2d.shape[1]
    if grad_x2d.shape != (R, M):
        raise ValueError(f"grad_x2d: expected shape ({R}, {M}), got {tuple(grad_x2d.shape)}")
    clean2d = clean2d.contiguous()
    corrupt = clean2d if corrupt2d is None else corrupt2d.contiguous()
    grad_x2d = grad_x2d.contiguous()
    z = z.to(torch.float32).contiguous()
    accumulate = grad_clean_out is not None
    if accumulate and (grad_clean_out.shape != clean2d.shape or grad_clean_out.dtype != clean2d.dtype
                       or grad_clean_out.device != clean2d.device or not grad_clean_out.is_contiguous()):
        raise ValueError(f"grad_clean_out: expected a contiguous {clean2d.dtype} tensor of shape "
                         f"{tuple(clean2d.shape)} on {clean2d.device}, got {grad_clean_out.dtype} "
                         f"{tuple(grad_clean_out.shape)} on {grad_clean_out.device}")
    grad_clean = grad_clean_out if accumulate else torch.empty_like(clean2d)
    cfg = _config("bwd", R, M, clean2d.dtype)
    n_col_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    if R == 0 or W == 0 or n_col_blocks == 0:
        return torch.zeros((R, W), dtype=torch.float32, device=z.device), \
            grad_clean if accumulate else grad_clean.zero_()
    cap = max_programs if max_programs is not None else _default_max_programs(clean2d.device)
    n_prog = max(1, min(n_col_blocks, int(cap)))
    partials = torch.empty((n_prog, R, W), dtype=torch.float32, device=z.device)  # every program fills its slice
    _mix_bwd_kernel[(n_prog,)](
        grad_clean, partials, grad_x2d, z, clean2d, corrupt, R, W, M, n_col_blocks,
        HAS_CORRUPT=corrupt2d is not None, ONE_R_BLOCK=R <= cfg["BLOCK_R"], DOT_PRECISION=_dot_precision(clean2d.dtype),
        ACCUMULATE=accumulate, **cfg)
    return partials.sum(0), grad_clean
