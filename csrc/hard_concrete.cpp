// Hard-concrete masks on the CPU: elementwise forward and backward (ARCHITECTURE.md §2).
//
//   s = sigmoid((log u - log(1 - u) + log_alpha) / beta)   training (u given)
//   s = sigmoid(log_alpha)                                  deterministic
//   v = s * (right - left) + left;  z = clamp(v, 0, 1)
//   dz/dlog_alpha = (right - left) * s * (1 - s) [/ beta when training], 0 where 0 <= v <= 1 fails
//
// The gradient passes where 0 <= v <= 1 inclusive (torch.clamp's autograd convention) and
// is computed in autograd's order, so it matches hard_concrete_reference differentiated by
// autograd. Shapes: any; float32 or float64; u the same shape and dtype as log_alpha.
#include "checks.h"
#include "ops.h"

namespace edgeprune {

void check_mask_and_noise(const at::Tensor& log_alpha, const std::optional<at::Tensor>& u, bool training,
                          const char* la_name, const char* u_name) {
  TORCH_CHECK_VALUE(log_alpha.device().is_cpu(), la_name, ": expected a CPU tensor, got ", shape_of(log_alpha));
  TORCH_CHECK_VALUE(log_alpha.is_contiguous(), la_name, ": expected a contiguous tensor");
  TORCH_CHECK_VALUE(log_alpha.scalar_type() == at::kFloat || log_alpha.scalar_type() == at::kDouble, la_name,
                    ": expected float32 or float64, got ", shape_of(log_alpha));
  if (!training) return;  // the deterministic form reads no noise
  TORCH_CHECK_VALUE(u.has_value(), u_name, ": expected uniforms of shape ", log_alpha.sizes(),
                    " when training (this backend draws no noise from a seed), got None");
  const at::Tensor& uu = *u;
  TORCH_CHECK_VALUE(uu.device().is_cpu(), u_name, ": expected a CPU tensor, got ", shape_of(uu));
  TORCH_CHECK_VALUE(uu.is_contiguous(), u_name, ": expected a contiguous tensor");
  TORCH_CHECK_VALUE(uu.sizes() == log_alpha.sizes(), u_name, ": expected the shape of ", la_name, " ",
                    log_alpha.sizes(), ", got ", shape_of(uu));
  TORCH_CHECK_VALUE(uu.scalar_type() == log_alpha.scalar_type(), u_name, ": expected the dtype of ", la_name, " (",
                    log_alpha.scalar_type(), "), got ", shape_of(uu));
}

at::Tensor hard_concrete_forward(const at::Tensor& log_alpha, const std::optional<at::Tensor>& u, bool training,
                                 double beta, double left, double right) {
  check_mask_and_noise(log_alpha, u, training, "log_alpha", "u");
  at::Tensor z = at::empty_like(log_alpha);
  AT_DISPATCH_FLOATING_TYPES(log_alpha.scalar_type(), "hard_concrete_forward", [&] {
    const scalar_t* up = training ? u->const_data_ptr<scalar_t>() : nullptr;
    hard_concrete_into<scalar_t>(z.mutable_data_ptr<scalar_t>(), log_alpha.const_data_ptr<scalar_t>(), up,
                                 log_alpha.numel(), training, HardConcrete{beta, left, right});
  });
  return z;
}

at::Tensor hard_concrete_backward(const at::Tensor& grad_z, const at::Tensor& log_alpha,
                                  const std::optional<at::Tensor>& u, bool training, double beta, double left,
                                  double right) {
  check_mask_and_noise(log_alpha, u, training, "log_alpha", "u");
  EP_CHECK_CPU(grad_z);
  EP_CHECK_CONTIGUOUS(grad_z);
  EP_CHECK_SAME_SHAPE(grad_z, log_alpha);
  EP_CHECK_SAME_DTYPE(grad_z, log_alpha);
  at::Tensor grad = at::empty_like(log_alpha);
  AT_DISPATCH_FLOATING_TYPES(log_alpha.scalar_type(), "hard_concrete_backward", [&] {
    const scalar_t* la = log_alpha.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_z.const_data_ptr<scalar_t>();
    const scalar_t* up = training ? u->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const scalar_t b = scalar_t(beta), scale = scalar_t(right - left), l = scalar_t(left);
    for (int64_t i = 0; i < log_alpha.numel(); ++i) {
      const scalar_t s = hc_s(la[i], up, i, training, b);
      const scalar_t v = s * scale + l;
      scalar_t d = g[i] * scale;  // autograd's order: clamp, * (right - left), sigmoid', / beta
      d = d * (scalar_t(1) - s) * s;
      if (training) d = d / b;
      out[i] = (v >= scalar_t(0) && v <= scalar_t(1)) ? d : scalar_t(0);
    }
  });
  return grad;
}

}  // namespace edgeprune
