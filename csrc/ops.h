// The CPU ops of edgeprune_fast._C and the hard-concrete maths they share.
//
// Maths: ARCHITECTURE.md §2 (Louizos et al., 2018 for the hard concrete). Shapes:
//   log_alpha, u, z         any shape (hard_concrete), [R, W] edge masks, [W] node masks;
//                           float32, or float64 for float64 inputs; contiguous
//   clean, corrupt, grad_x  [W, M] and [R, M] (M = all dims after the first, flattened),
//                           float32 / bfloat16 / float16 / float64, contiguous
//   base                    [M], the arithmetic dtype (float32, float64 for float64 writers)
// These ops draw no noise: u comes from the caller (the Python side draws it from a seed),
// so the backend reports supports_seed = False.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace edgeprune {

// The constants of HardConcreteParams that the ops need (eps only matters when drawing u).
struct HardConcrete {
  double beta, left, right;
};

// s = sigmoid((log u - log(1 - u) + log_alpha) / beta) when training, sigmoid(log_alpha) otherwise.
template <typename T>
inline T hc_s(T la, const T* u, int64_t i, bool training, T beta) {
  T a = training ? (std::log(u[i]) - std::log1p(-u[i]) + la) / beta : la;
  return T(1) / (T(1) + std::exp(-a));
}

// z = clamp(s * (right - left) + left, 0, 1)
template <typename T>
inline T hc_z(T s, T scale, T left) {
  T v = s * scale + left;
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

// z over a whole mask tensor (log_alpha and u contiguous, same dtype T), into z.
template <typename T>
void hard_concrete_into(T* z, const T* la, const T* u, int64_t n, bool training, const HardConcrete& p) {
  const T beta = T(p.beta), scale = T(p.right - p.left), left = T(p.left);
  for (int64_t i = 0; i < n; ++i) z[i] = hc_z(hc_s(la[i], u, i, training, beta), scale, left);
}

at::Tensor hard_concrete_forward(const at::Tensor& log_alpha, const std::optional<at::Tensor>& u, bool training,
                                 double beta, double left, double right);

at::Tensor hard_concrete_backward(const at::Tensor& grad_z, const at::Tensor& log_alpha,
                                  const std::optional<at::Tensor>& u, bool training, double beta, double left,
                                  double right);

std::tuple<at::Tensor, at::Tensor> edge_mix_forward(const at::Tensor& log_alpha_edge,
                                                    const std::optional<at::Tensor>& log_alpha_node,
                                                    const at::Tensor& clean, const std::optional<at::Tensor>& corrupt,
                                                    const std::optional<at::Tensor>& u_edge,
                                                    const std::optional<at::Tensor>& u_node, bool training,
                                                    double beta, double left, double right,
                                                    const std::optional<at::Tensor>& base = std::nullopt);

at::Tensor mix_forward(const at::Tensor& z, const at::Tensor& clean, const std::optional<at::Tensor>& corrupt,
                       const std::optional<at::Tensor>& base = std::nullopt);

std::tuple<at::Tensor, at::Tensor> mix_backward(const at::Tensor& grad_x, const at::Tensor& z, const at::Tensor& clean,
                                                const std::optional<at::Tensor>& corrupt,
                                                const std::optional<at::Tensor>& grad_clean_out = std::nullopt);

// Shared by the two files: the mask checks of hard_concrete and edge_mix.
void check_mask_and_noise(const at::Tensor& log_alpha, const std::optional<at::Tensor>& u, bool training,
                          const char* la_name, const char* u_name);

}  // namespace edgeprune
