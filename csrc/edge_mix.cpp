// Masked clean/corrupted aggregation on the CPU, fused with the hard-concrete sampling
// (ARCHITECTURE.md §2):
//
//   z_eff[r, w] = z_edge[r, w] * z_node[w]                                   [R, W]
//   x[r, :]     = base[:] + sum_w corrupt[w, :] + sum_w z_eff[r, w] * (clean[w, :] - corrupt[w, :])
//   grad_z[r, w]     = <grad_x[r, :], clean[w, :] - corrupt[w, :]>
//   grad_clean[w, :] = sum_r z_eff[r, w] * grad_x[r, :]
//
// clean, corrupt [W, M], grad_x and x [R, M] (M = tokens * d_model flattened); corrupt absent
// means zero ablation; base [M] (optional, in the arithmetic dtype) is a constant every
// reader's input starts from (the model passes the corrupted prefix sum: adding it here
// saves a pass over x and rounds once). Arithmetic is float32 (float64 for float64
// writers), whatever the storage dtype.
//
// How: the columns M are cut into tiles of T columns (about 256K elements of writer data,
// 1 MB in fp32, 256 to 4096 columns: wide enough for BLAS to run at full speed on these
// skinny products, small enough to stay in cache). For each tile the difference
// (clean - corrupt) and the column sums of corrupt are formed once, in a small per-thread
// float32 buffer, and one matrix product with the [R, W] masks (at::mm / at::addmm_, MKL's
// GEMM in PyTorch's builds) gives the tile of x; backward does the same with grad_x.
// Nothing of size [R, W, M] or a full [W, M] difference is ever made: peak extra memory is
// a few tile buffers per thread plus 32 [R, W] partial sums. Tiles run in parallel on
// ATen's thread pool: at::parallel_for is an inline OpenMP region in PyTorch's builds,
// compiled here with -fopenmp, so inside it at::mm runs on one thread. The masks are
// sampled once per call, at its start: with R * W a few thousand entries, that is cheaper
// than re-sampling them in every tile.
//
// Determinism: grad_z, the only reduction over M, is summed per chunk of tiles into its
// own [R, W] partial, and the partials are added in chunk order; chunk boundaries depend
// on M and W only, never on the number of threads or their timing, so the same inputs give
// the same bits.
#include "checks.h"
#include "ops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace edgeprune {
namespace {

constexpr int64_t kTileElements = 262144;  // elements of writer data per tile (1 MB in fp32)
constexpr int64_t kMaxChunks = 32;         // [R, W] partial sums of grad_z

int64_t tile_columns(int64_t W) {
  int64_t t = std::clamp<int64_t>(kTileElements / std::max<int64_t>(W, 1), 256, 4096);
  return (t + 63) / 64 * 64;  // whole cache lines
}

// diff[w, j] = clean[w, c0 + j] - corrupt[w, c0 + j] (ld columns a row) for j < n, and, when base is
// given, base[j] = sum_w corrupt[w, c0 + j] (w ascending). Without corrupt, diff = clean.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* clean, const scalar_t* corrupt, int64_t W, int64_t M, int64_t c0, int64_t n,
               acc_t* diff, int64_t ld, acc_t* base) {
  for (int64_t w = 0; w < W; ++w) {
    const scalar_t* c = clean + w * M + c0;
    acc_t* d = diff + w * ld;
    if (corrupt == nullptr) {
      for (int64_t j = 0; j < n; ++j) d[j] = static_cast<acc_t>(c[j]);
      continue;
    }
    const scalar_t* k = corrupt + w * M + c0;
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<acc_t>(c[j]) - static_cast<acc_t>(k[j]);
    if (base != nullptr) {
      if (w == 0) {
        for (int64_t j = 0; j < n; ++j) base[j] = static_cast<acc_t>(k[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) base[j] += static_cast<acc_t>(k[j]);
      }
    }
  }
}

// dst[i, c0 + j] = src[i, j] for i < rows, j < n (src ld columns a row), converting to the storage dtype.
template <typename scalar_t, typename acc_t>
void store_tile(scalar_t* dst, int64_t M, int64_t c0, const acc_t* src, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* o = dst + i * M + c0;
    const acc_t* s = src + i * ld;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(s[j]);
  }
}

// dst[i, c0 + j] += src[i, j]: the same, adding to what dst holds (the sum in the arithmetic dtype).
template <typename scalar_t, typename acc_t>
void add_tile(scalar_t* dst, int64_t M, int64_t c0, const acc_t* src, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* o = dst + i * M + c0;
    const acc_t* s = src + i * ld;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + s[j]);
  }
}

// out (+)= z^T @ g for zt [W, R] (z transposed), g [R, n], out [W, n] (strided views in the
// arithmetic dtype). A single reader (the MLP, resid_post) is a row scaling, not a K=1 matrix
// product, which BLAS runs far below memory speed.
template <typename acc_t>
void spread(at::Tensor& out, const at::Tensor& zt, const at::Tensor& g, bool accumulate) {
  if (zt.size(1) != 1) {
    if (accumulate) {
      out.addmm_(zt, g);
    } else {
      at::mm_out(out, zt, g);
    }
    return;
  }
  const int64_t W = out.size(0), n = out.size(1), ld = out.stride(0);
  const acc_t* z = zt.const_data_ptr<acc_t>();  // [W, 1]: W contiguous values
  const acc_t* gr = g.const_data_ptr<acc_t>();
  acc_t* o = out.mutable_data_ptr<acc_t>();
  for (int64_t w = 0; w < W; ++w) {
    const acc_t zw = z[w * zt.stride(0)];
    acc_t* ow = o + w * ld;
    if (accumulate) {
      for (int64_t j = 0; j < n; ++j) ow[j] += zw * gr[j];
    } else {
      for (int64_t j = 0; j < n; ++j) ow[j] = zw * gr[j];
    }
  }
}

// A [rows, n] view of a row-major matrix with `ld` columns a row, starting at p (no copy).
template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t n, int64_t ld) {
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {rows, n}, {ld, 1}, options);
}

// x = base + sum_w corrupt[w] + z @ (clean - corrupt), z [R, W] contiguous in the arithmetic dtype,
// base [M] in the arithmetic dtype or null.
template <typename scalar_t>
at::Tensor mix_tiles(const at::Tensor& z, const at::Tensor& clean, const scalar_t* corrupt,
                     const at::opmath_type<scalar_t>* ubase) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // x is written in place, no staging buffer
  const int64_t R = z.size(0), W = z.size(1), M = clean.size(1);
  at::Tensor x = at::empty({R, M}, clean.options());
  if (R == 0 || M == 0) return x;
  if (W == 0) {
    if (ubase == nullptr) return x.zero_();
    return x.copy_(view<acc_t>(ubase, 1, M, M).expand({R, M}));
  }
  const int64_t T = std::min(tile_columns(W), M);
  const int64_t n_tiles = (M + T - 1) / T;
  const scalar_t* cl = clean.const_data_ptr<scalar_t>();
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  const auto acc = clean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode no_autograd;  // worker threads do not inherit the caller's grad mode
    const bool need_diff = corrupt != nullptr || !direct;  // else the product reads clean in place
    at::Tensor diff = need_diff ? at::empty({W, T}, acc) : at::Tensor();
    at::Tensor base = corrupt != nullptr ? at::empty({T}, acc) : at::Tensor();  // sum_w corrupt (+ ubase)
    at::Tensor ybuf = direct ? at::Tensor() : at::empty({R, T}, acc);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = tile * T, n = std::min(T, M - c0);
      at::Tensor d;
      if (need_diff) {
        load_tile<scalar_t, acc_t>(cl, corrupt, W, M, c0, n, diff.data_ptr<acc_t>(), T,
                                   corrupt != nullptr ? base.data_ptr<acc_t>() : nullptr);
        d = view<acc_t>(diff.data_ptr<acc_t>(), W, n, T);
      } else {
        d = view<acc_t>(reinterpret_cast<const acc_t*>(cl) + c0, W, n, M);
      }
      at::Tensor y = direct ? view<acc_t>(reinterpret_cast<acc_t*>(xp) + c0, R, n, M)
                            : view<acc_t>(ybuf.data_ptr<acc_t>(), R, n, T);
      const acc_t* start = nullptr;  // the row every reader starts from, if any
      if (corrupt != nullptr) {
        acc_t* b = base.data_ptr<acc_t>();
        if (ubase != nullptr)
          for (int64_t j = 0; j < n; ++j) b[j] += ubase[c0 + j];
        start = b;
      } else if (ubase != nullptr) {
        start = ubase + c0;
      }
      if (start != nullptr) {
        y.copy_(view<acc_t>(start, 1, n, T).expand({R, n}));
        y.addmm_(z, d);
      } else {
        at::mm_out(y, z, d);
      }
      if constexpr (!direct) store_tile<scalar_t, acc_t>(xp, M, c0, ybuf.data_ptr<acc_t>(), T, R, n);
    }
  });
  return x;
}

// (grad_z in the arithmetic dtype, grad_clean in clean's dtype); z [R, W] contiguous in the arithmetic dtype.
// With grad_clean_out ([W, M] contiguous, clean's dtype) the gradient is added into it instead of
// written to a new tensor, which is returned.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> mix_backward_tiles(const at::Tensor& grad_x, const at::Tensor& z,
                                                      const at::Tensor& clean, const scalar_t* corrupt,
                                                      const std::optional<at::Tensor>& grad_clean_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  const int64_t R = z.size(0), W = z.size(1), M = clean.size(1);
  const auto acc = clean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool accumulate = grad_clean_out.has_value();
  at::Tensor grad_clean = accumulate ? *grad_clean_out : at::empty({W, M}, clean.options());
  if (R == 0 || W == 0 || M == 0) {
    if (!accumulate) grad_clean.zero_();
    return {at::zeros({R, W}, acc), grad_clean};
  }
  const int64_t T = std::min(tile_columns(W), M);
  const int64_t n_tiles = (M + T - 1) / T;
  const int64_t n_chunks = std::min(n_tiles, kMaxChunks);
  at::Tensor partial = at::empty({n_chunks, R, W}, acc);
  const at::Tensor zt = z.t();  // [W, R]
  const scalar_t* cl = clean.const_data_ptr<scalar_t>();
  const scalar_t* gx = grad_x.const_data_ptr<scalar_t>();
  scalar_t* gc = grad_clean.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode no_autograd;
    const bool need_diff = corrupt != nullptr || !direct;
    at::Tensor diff = need_diff ? at::empty({W, T}, acc) : at::Tensor();
    at::Tensor gbuf = direct ? at::Tensor() : at::empty({R, T}, acc);
    at::Tensor gcbuf = direct ? at::Tensor() : at::empty({W, T}, acc);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor p = partial[chunk];  // [R, W], this chunk's share of grad_z
      const int64_t t0 = chunk * n_tiles / n_chunks, t1 = (chunk + 1) * n_tiles / n_chunks;
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t c0 = tile * T, n = std::min(T, M - c0);
        at::Tensor d, g, gcv;
        if (need_diff) {
          load_tile<scalar_t, acc_t>(cl, corrupt, W, M, c0, n, diff.data_ptr<acc_t>(), T, nullptr);
          d = view<acc_t>(diff.data_ptr<acc_t>(), W, n, T);
        } else {
          d = view<acc_t>(reinterpret_cast<const acc_t*>(cl) + c0, W, n, M);
        }
        if constexpr (direct) {
          g = view<acc_t>(reinterpret_cast<const acc_t*>(gx) + c0, R, n, M);
          gcv = view<acc_t>(reinterpret_cast<acc_t*>(gc) + c0, W, n, M);
        } else {
          load_tile<scalar_t, acc_t>(gx, nullptr, R, M, c0, n, gbuf.data_ptr<acc_t>(), T, nullptr);
          g = view<acc_t>(gbuf.data_ptr<acc_t>(), R, n, T);
          gcv = view<acc_t>(gcbuf.data_ptr<acc_t>(), W, n, T);
        }
        if (tile == t0) {
          at::mm_out(p, g, d.t());  // p[r, w] = sum_j g[r, j] * d[w, j]
        } else {
          p.addmm_(g, d.t());
        }
        spread<acc_t>(gcv, zt, g, accumulate && direct);  // grad_clean tile (+)= z^T @ grad_x tile
        if constexpr (!direct) {
          if (accumulate) {
            add_tile<scalar_t, acc_t>(gc, M, c0, gcbuf.data_ptr<acc_t>(), T, W, n);
          } else {
            store_tile<scalar_t, acc_t>(gc, M, c0, gcbuf.data_ptr<acc_t>(), T, W, n);
          }
        }
      }
    }
  });

  // the partials, added in chunk order: the same bits whatever the threads did
  at::Tensor grad_z = partial[0].clone();
  acc_t* out = grad_z.data_ptr<acc_t>();
  for (int64_t c = 1; c < n_chunks; ++c) {
    const acc_t* pc = partial[c].const_data_ptr<acc_t>();
    for (int64_t i = 0; i < R * W; ++i) out[i] += pc[i];
  }
  return {grad_z, grad_clean};
}

// The arithmetic dtype of the mixing: float64 for float64 writers, else float32.
at::ScalarType arithmetic_dtype(const at::Tensor& clean) {
  return clean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_writers(const at::Tensor& clean, const std::optional<at::Tensor>& corrupt, int64_t W) {
  EP_CHECK_DATA(clean);
  EP_CHECK_SIZE(clean, 0, W);
  if (corrupt.has_value()) {
    const at::Tensor& c = *corrupt;
    EP_CHECK_DATA(c);
    TORCH_CHECK_VALUE(c.sizes() == clean.sizes(), "corrupt: expected the shape of clean ", clean.sizes(), ", got ",
                      shape_of(c));
    TORCH_CHECK_VALUE(c.scalar_type() == clean.scalar_type(), "corrupt: expected the dtype of clean (",
                      clean.scalar_type(), "), got ", shape_of(c));
  }
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// base: [M] contiguous (any shape with M elements), in the arithmetic dtype of clean.
void check_base(const std::optional<at::Tensor>& base_opt, const at::Tensor& clean) {
  if (!base_opt.has_value()) return;
  const at::Tensor& base = *base_opt;
  EP_CHECK_CPU(base);
  EP_CHECK_CONTIGUOUS(base);
  TORCH_CHECK_VALUE(base.numel() == clean.size(1), "base: expected ", clean.size(1),
                    " elements (one row of the writers' [W, M] view), got ", shape_of(base));
  TORCH_CHECK_VALUE(base.scalar_type() == arithmetic_dtype(clean), "base: expected dtype ", arithmetic_dtype(clean),
                    " (the arithmetic dtype of clean), got ", shape_of(base));
}

template <typename scalar_t>
const at::opmath_type<scalar_t>* base_or_null(const std::optional<at::Tensor>& base) {
  return base.has_value() ? base->const_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> edge_mix_forward(const at::Tensor& log_alpha_edge,
                                                    const std::optional<at::Tensor>& log_alpha_node,
                                                    const at::Tensor& clean, const std::optional<at::Tensor>& corrupt,
                                                    const std::optional<at::Tensor>& u_edge,
                                                    const std::optional<at::Tensor>& u_node, bool training,
                                                    double beta, double left, double right,
                                                    const std::optional<at::Tensor>& base) {
  EP_CHECK_DIM(log_alpha_edge, 2);
  check_mask_and_noise(log_alpha_edge, u_edge, training, "log_alpha_edge", "u_edge");
  const int64_t R = log_alpha_edge.size(0), W = log_alpha_edge.size(1);
  if (log_alpha_node.has_value()) {
    const at::Tensor& ln = *log_alpha_node;
    EP_CHECK_DIM(ln, 1);
    EP_CHECK_SIZE(ln, 0, W);
    EP_CHECK_SAME_DTYPE(ln, log_alpha_edge);
    check_mask_and_noise(ln, u_node, training, "log_alpha_node", "u_node");
  }
  check_writers(clean, corrupt, W);
  check_base(base, clean);

  // z_eff = z_edge * z_node, sampled here, in the same call as the mixing
  at::Tensor z_eff = at::empty_like(log_alpha_edge);
  const HardConcrete p{beta, left, right};
  AT_DISPATCH_FLOATING_TYPES(log_alpha_edge.scalar_type(), "edge_mix_masks", [&] {
    scalar_t* z = z_eff.mutable_data_ptr<scalar_t>();
    hard_concrete_into<scalar_t>(z, log_alpha_edge.const_data_ptr<scalar_t>(),
                                 training ? u_edge->const_data_ptr<scalar_t>() : nullptr, R * W, training, p);
    if (log_alpha_node.has_value()) {
      std::vector<scalar_t> zn(W);
      hard_concrete_into<scalar_t>(zn.data(), log_alpha_node->const_data_ptr<scalar_t>(),
                                   training ? u_node->const_data_ptr<scalar_t>() : nullptr, W, training, p);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t w = 0; w < W; ++w) z[r * W + w] *= zn[w];
    }
  });

  const at::Tensor z = z_eff.to(arithmetic_dtype(clean)).contiguous();  // no autograd history
  at::Tensor x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, clean.scalar_type(), "edge_mix_forward", [&] {
    x = mix_tiles<scalar_t>(z, clean, ptr_or_null<scalar_t>(corrupt), base_or_null<scalar_t>(base));
  });
  return {x, z_eff};
}

at::Tensor mix_forward(const at::Tensor& z, const at::Tensor& clean, const std::optional<at::Tensor>& corrupt,
                       const std::optional<at::Tensor>& base) {
  EP_CHECK_MASK(z);
  EP_CHECK_DIM(z, 2);
  check_writers(clean, corrupt, z.size(1));
  check_base(base, clean);
  const at::Tensor za = z.detach().to(arithmetic_dtype(clean)).contiguous();
  at::Tensor x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, clean.scalar_type(), "mix_forward", [&] {
    x = mix_tiles<scalar_t>(za, clean, ptr_or_null<scalar_t>(corrupt), base_or_null<scalar_t>(base));
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor> mix_backward(const at::Tensor& grad_x, const at::Tensor& z, const at::Tensor& clean,
                                                const std::optional<at::Tensor>& corrupt,
                                                const std::optional<at::Tensor>& grad_clean_out) {
  EP_CHECK_MASK(z);
  EP_CHECK_DIM(z, 2);
  check_writers(clean, corrupt, z.size(1));
  EP_CHECK_DATA(grad_x);
  EP_CHECK_SIZE(grad_x, 0, z.size(0));
  EP_CHECK_SIZE(grad_x, 1, clean.size(1));
  EP_CHECK_SAME_DTYPE(grad_x, clean);
  if (grad_clean_out.has_value()) {
    const at::Tensor& out = *grad_clean_out;
    EP_CHECK_DATA(out);
    TORCH_CHECK_VALUE(out.sizes() == clean.sizes(), "grad_clean_out: expected the shape of clean ", clean.sizes(),
                      ", got ", shape_of(out));
    EP_CHECK_SAME_DTYPE(out, clean);
  }
  const at::Tensor za = z.detach().to(arithmetic_dtype(clean)).contiguous();
  at::Tensor grad_z, grad_clean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, clean.scalar_type(), "mix_backward", [&] {
    std::tie(grad_z, grad_clean) =
        mix_backward_tiles<scalar_t>(grad_x, za, clean, ptr_or_null<scalar_t>(corrupt), grad_clean_out);
  });
  return {grad_z.to(z.scalar_type()), grad_clean};
}

}  // namespace edgeprune
